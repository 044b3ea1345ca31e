// Fused attention on the CPU, FlashAttention-2 style.
//
// Forward: each task takes one to four blocks of queries of one (batch, head)
// and runs over blocks of keys, each packed once for all of them, with an
// online softmax, so the L x S score matrix is never built; it saves the output
// and the per-row log-sum-exp (lse). The tile products QK^T and PV go to the
// BLAS that torch ships (sgemm/dgemm) on float32 (float64) copies of the rows,
// or, in the avx2 and avx512 variants, to the register tiles of dot_tiles.h:
// float32 on FMAs, and (avx512) bfloat16 on a CPU with AVX512-BF16 on its dot
// products (the probabilities and score gradients rounded to bfloat16 for their
// products, as torch's own CPU flash attention does; accumulation in float32),
// on the AMX tiles of amx_tiles.h where the CPU has AMX-BF16.
// Other float16 and bfloat16 inputs are widened to float32 block by block and
// take the float32 tiles; BLAS is left with float64 (and everything in the
// default variant, which has no register tiles). A few query rows per head
// (direct_most_queries) take the products of direct_tiles.h in both passes:
// keys and values read where they lie, nothing packed.
//
// Backward: recomputes each score tile from q, k and the saved lse. A task owns
// a set of key blocks of one (batch, kv head): it accumulates their dK, dV over
// every query block of every query head that shares the kv head (GQA), each
// query block packed once for all of them, and adds its share of dQ into a
// per-task-group buffer, so that one (batch, head) can still use every core.
//
// Shapes: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), Hq % Hkv == 0;
// mask (B, Hq, L, S) with any strides (broadcast dims have stride 0), bool
// (true = attend) or the accumulation dtype (added to the scores).
// out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) in the accumulation dtype
// (float32, or float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <vector>

#include "../cpu_isa.h"
#include "../attention_checks.h"
#include "attention_math.h"
#include "amx_tiles.h"
#include "attention_tiles.h"
#include "direct_tiles.h"
#include "dot_tiles.h"
#include "cpu_kernels.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h
namespace {

// Tile sizes (rows of queries x rows of keys), chosen with the bench command's attention
// cases on a 2-core AVX-512 machine: large enough for BLAS efficiency, small enough
// that a tile and its operands stay in L2.
constexpr int64_t kForwardQueryBlock = 256;
constexpr int64_t kForwardKeyBlock = 512;
constexpr int64_t kBackwardQueryBlock = 128;
constexpr int64_t kBackwardKeyBlock = 256;

using Shape = AttentionShape;

// The shared checks, and the dtypes these kernels serve.
Shape checked_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const Shape shape = attention_shape(q, k, v);
  TORCH_CHECK(at::isFloatingType(q.scalar_type()),
              "attnkernels::attention: expected floating-point query, key and value, got ", q.scalar_type());
  return shape;
}

// ----------------------------------------------------------------------------- tile products

// The forward's products on acc_t copies of the rows, through BLAS.
template <typename scalar_t>
struct BlasForwardTiles {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  int64_t E, Ev;
  AlignedVector<acc_t> q_buffer, k_buffer, v_buffer;
  const acc_t *q_tile = nullptr, *k_tile = nullptr, *v_tile = nullptr;
  // How many probabilities past a row's causal diagonal add_values reads (they must be 0): all of them.
  static constexpr int64_t kReadsPastDiagonal = std::numeric_limits<int64_t>::max();
  // Whether the products skip what a causal diagonal hides, so that a block may take keys its rows
  // cannot see at no cost and with no bit changed: not through BLAS.
  static constexpr bool kSkipsBehindDiagonal = false;
  static constexpr bool kRoundsInExpPass = false;  // see DotForwardTiles

  // query_rows: the most rows load_queries takes; query_block: the most rows of a product.
  BlasForwardTiles(int64_t query_rows, int64_t /*query_block*/, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), q_buffer(kConvert ? query_rows * E : 0), k_buffer(kConvert ? key_block * E : 0),
        v_buffer(kConvert ? key_block * Ev : 0) {}

  // q: (rows, E) contiguous, rows up to the query capacity the tiles were made for.
  void load_queries(const scalar_t* q, int64_t rows) { q_tile = rows_as_acc(q, 0, rows, E, q_buffer.data()); }
  // k: (cols, E), v: (cols, Ev), contiguous.
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    k_tile = rows_as_acc(k, 0, cols, E, k_buffer.data());
    v_tile = rows_as_acc(v, 0, cols, Ev, v_buffer.data());
  }
  // scores (rows x cols, row stride ld) = scale * Q K^T for the loaded queries [first, first + rows);
  // entries behind the diagonal may be left as they were.
  void scores(int64_t first, int64_t rows, int64_t cols, acc_t scale, acc_t* out, int64_t ld, Diagonal = {}) {
    gemm<acc_t>(false, true, rows, cols, E, scale, q_tile + first * E, E, k_tile, E, acc_t(0), out, ld);
  }
  // accum (rows x Ev) += probs V, probs (rows x cols, row stride ld), zero behind the diagonal.
  void add_values(int64_t rows, int64_t cols, const acc_t* probs, int64_t ld, acc_t* accum, Diagonal = {}) {
    gemm<acc_t>(false, false, rows, Ev, cols, acc_t(1), probs, ld, v_tile, Ev, acc_t(1), accum, Ev);
  }
};

// The backward's products on acc_t copies of the rows, through BLAS; it owns the key block's dK, dV.
template <typename scalar_t>
struct BlasBackwardTiles {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  int64_t E, Ev;
  AlignedVector<acc_t> q_buffer, do_buffer, k_buffer, v_buffer, dk, dv;
  const acc_t *q_tile = nullptr, *do_tile = nullptr, *k_tile = nullptr, *v_tile = nullptr;
  // How many entries of P and dS past a query row's causal diagonal the products read (they must be 0).
  static constexpr int64_t kReadsPastDiagonal = std::numeric_limits<int64_t>::max();

  BlasBackwardTiles(int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), q_buffer(kConvert ? query_block * E : 0), do_buffer(kConvert ? query_block * Ev : 0),
        k_buffer(kConvert ? key_block * E : 0), v_buffer(kConvert ? key_block * Ev : 0), dk(key_block * E),
        dv(key_block * Ev) {}

  // k: (cols, E), v: (cols, Ev), contiguous; clears dK, dV.
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    k_tile = rows_as_acc(k, 0, cols, E, k_buffer.data());
    v_tile = rows_as_acc(v, 0, cols, Ev, v_buffer.data());
    std::fill(dk.begin(), dk.end(), acc_t(0));
    std::fill(dv.begin(), dv.end(), acc_t(0));
  }
  void begin_task(int64_t /*query_slots*/) {}
  // q: (rows, E), grad_out: (rows, Ev), contiguous (the slot is for the register tiles' packing).
  void load_queries(const scalar_t* q, const scalar_t* grad_out, int64_t rows, int64_t /*slot*/) {
    q_tile = rows_as_acc(q, 0, rows, E, q_buffer.data());
    do_tile = rows_as_acc(grad_out, 0, rows, Ev, do_buffer.data());
  }
  // out (rows x cols, row stride ld) = scale * Q K^T; entries behind the diagonal may be left as they were.
  void scores(int64_t rows, int64_t cols, acc_t scale, acc_t* out, int64_t ld, Diagonal = {}) {
    gemm<acc_t>(false, true, rows, cols, E, scale, q_tile, E, k_tile, E, acc_t(0), out, ld);
  }
  // out (rows x cols) = dO V^T; entries behind the diagonal may be left as they were.
  void grad_probs(int64_t rows, int64_t cols, acc_t* out, int64_t ld, Diagonal = {}) {
    gemm<acc_t>(false, true, rows, cols, Ev, acc_t(1), do_tile, Ev, v_tile, Ev, acc_t(0), out, ld);
  }
  // dV += P^T dO (P, like dS below, zero behind the diagonal)
  void add_grad_values(int64_t rows, int64_t cols, const acc_t* probs, int64_t ld, Diagonal = {}) {
    gemm<acc_t>(true, false, cols, Ev, rows, acc_t(1), probs, ld, do_tile, Ev, acc_t(1), dv.data(), Ev);
  }
  // dK += scale * dS^T Q
  void add_grad_keys(int64_t rows, int64_t cols, const acc_t* grad_scores, int64_t ld, acc_t scale, Diagonal = {}) {
    gemm<acc_t>(true, false, cols, E, rows, scale, grad_scores, ld, q_tile, E, acc_t(1), dk.data(), E);
  }
  // dq (rows x E, contiguous) += scale * dS K
  void add_grad_queries(int64_t rows, int64_t cols, const acc_t* grad_scores, int64_t ld, acc_t scale, acc_t* dq,
                        Diagonal = {}) {
    gemm<acc_t>(false, false, rows, E, cols, scale, grad_scores, ld, k_tile, E, acc_t(1), dq, E);
  }
  // grad_k: (cols, E), grad_v: (cols, Ev) of the key block.
  void store_key_grads(scalar_t* grad_k, scalar_t* grad_v, int64_t cols) const {
    for (int64_t i = 0; i < cols * E; ++i) grad_k[i] = static_cast<scalar_t>(dk[i]);
    for (int64_t i = 0; i < cols * Ev; ++i) grad_v[i] = static_cast<scalar_t>(dv[i]);
  }
};

#if defined(ATTNKERNELS_DOT_TILES)
// What a tile's causal diagonal lets a product skip.
inline Skip skip(Diagonal diagonal, CausalSkip kind) {
  return diagonal.present ? Skip{kind, diagonal.offset} : Skip{};
}

// The products on the register tiles of dot_tiles.h: bfloat16 on the AVX512-BF16 dot products
// (avx512 variant; E and Ev even, so that query and gradient rows are left operands as they
// are), float32 on FMAs (avx2 and avx512 variants). The probabilities and score gradients are
// left operands in float32 rows (rounded to bfloat16 for the dot products), or, in the
// forward, rounded by the softmax's exp pass itself (kRoundsInExpPass).
template <typename T>
struct DotForwardTiles {
  using Ops = DotOps<T>;
  using Word = typename Ops::Word;
  int64_t E, Ev;
  const T* q_rows = nullptr;
  AlignedVector<Word> keys_packed, values_packed;
  AlignedVector<T> probs_buffer;
  static constexpr int64_t kReadsPastDiagonal = kDotReadsPastDiagonal;
  static constexpr bool kSkipsBehindDiagonal = true;  // see BlasForwardTiles
  // bfloat16: the exp pass may write the probabilities rounded, where add_rounded_values reads
  // them (exp_pass_rounded), when nothing comes between (dropout does).
  static constexpr bool kRoundsInExpPass = !std::is_same_v<T, float>;

  DotForwardTiles(int64_t /*query_rows*/, int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), keys_packed(Ops::packed_size(E, key_block)), values_packed(Ops::packed_size(key_block, Ev)),
        probs_buffer(Ops::left_buffer_size(query_block, key_block)) {}

  void load_queries(const T* q, int64_t) { q_rows = q; }
  void load_keys(const T* k, const T* v, int64_t cols) {
    Ops::pack_rows(k, cols, E, E, keys_packed.data());
    Ops::pack_columns(v, cols, Ev, Ev, values_packed.data());
  }
  void scores(int64_t first, int64_t rows, int64_t cols, float scale, float* out, int64_t ld,
              Diagonal diagonal = {}) {
    Ops::product(rows, cols, E, Ops::rows(q_rows + first * E, E), keys_packed.data(), scale, false, out, ld,
                 skip(diagonal, CausalSkip::kColumnsAfter));
  }
  void add_values(int64_t rows, int64_t cols, const float* probs, int64_t ld, float* accum, Diagonal diagonal = {}) {
    Ops::product(rows, Ev, cols, Ops::rounded(probs, rows, cols, ld, probs_buffer.data()), values_packed.data(), 1.0f,
                 true, accum, Ev, skip(diagonal, CausalSkip::kReductionAfter));
  }
#if defined(ATTNKERNELS_BF16_TARGET)
  // Row r of a tile of `cols` keys: 2^((scores - shift) * to_log2) of its `visible` leading scores,
  // rounded, then the zeros that add_rounded_values reads past the diagonal; returns their float32 sum.
  float exp_pass_rounded(int64_t r, int64_t cols, const float* scores, int64_t visible, float shift, float to_log2) {
    T* row = probs_buffer.data() + r * Ops::left_row_stride(cols);
    const float sum = exp2_shifted_sum_rounded(scores, visible, shift, to_log2, reinterpret_cast<uint16_t*>(row));
    zero_rounded(row, visible, visible, cols);
    return sum;
  }
  // Row r all zeros, as far as add_rounded_values reads it: a row that attends to nothing yet.
  void zero_rounded_row(int64_t r, int64_t cols, int64_t visible) {
    zero_rounded(probs_buffer.data() + r * Ops::left_row_stride(cols), 0, visible, cols);
  }
  // accum (rows x Ev) += the rounded probabilities of rows [0, rows) times V.
  void add_rounded_values(int64_t rows, int64_t cols, float* accum, Diagonal diagonal = {}) {
    Ops::product(rows, Ev, cols, Ops::rounded_rows(probs_buffer.data(), cols), values_packed.data(), 1.0f, true, accum,
                 Ev, skip(diagonal, CausalSkip::kReductionAfter));
  }

 private:
  // Zeros in [from, end) of a rounded row, end: as far past `visible` as the product reads, within
  // the row and its pad.
  void zero_rounded(T* row, int64_t from, int64_t visible, int64_t cols) const {
    const int64_t end = std::min(Ops::left_row_stride(cols), visible + kReadsPastDiagonal);
    if (from < end) std::fill(row + from, row + end, T(0));
  }
#endif
};

// Which of a backward task's query slots hold their query block's packing (see DotBackwardTiles).
// With one slot (the task's blocks did not fit) every use packs again into slot 0.
class QuerySlots {
 public:
  void reset(int64_t slots) { packed_.assign(static_cast<size_t>(slots), 0); }
  bool kept() const { return packed_.size() > 1; }
  // Where a slot's packing goes.
  int64_t index(int64_t slot) const { return kept() ? slot : 0; }
  bool holds(int64_t slot) const { return kept() && packed_[static_cast<size_t>(slot)]; }
  void mark_packed(int64_t slot) {
    if (kept()) packed_[static_cast<size_t>(slot)] = 1;
  }

 private:
  std::vector<char> packed_ = std::vector<char>(1, 0);
};

// dK and dV (cols x E, cols x Ev, of the block's cols keys) reduce over the query rows: P^T and
// dS^T are their left operands (float32 read transposed in place; bfloat16 rounded and packed
// as pairs of query rows), Q and dO their right operands, packed by columns per query block.
// A task meets the same query blocks again for each of its key blocks: their packings are kept
// in slots (one per query block of each query head of the task's kv head) where they fit in
// kQuerySlotBytes, and packed once per task.
template <typename T>
struct DotBackwardTiles {
  using Ops = DotOps<T>;
  using Word = typename Ops::Word;
  static constexpr int64_t kQuerySlotBytes = int64_t(8) << 20;
  int64_t E, Ev, query_words, grad_out_words;
  const T *q_rows = nullptr, *do_rows = nullptr;
  const Word *q_packed = nullptr, *do_packed = nullptr;
  AlignedVector<Word> keys_by_rows, values_by_rows, keys_by_columns, queries_by_columns, grad_out_by_columns,
      operand_transposed;
  QuerySlots slots;
  AlignedVector<T> grad_scores_buffer;
  AlignedVector<float> dk, dv;
  static constexpr int64_t kReadsPastDiagonal = kDotReadsPastDiagonal;

  DotBackwardTiles(int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), query_words(Ops::packed_size(query_block, E)), grad_out_words(Ops::packed_size(query_block, Ev)),
        keys_by_rows(Ops::packed_size(E, key_block)), values_by_rows(Ops::packed_size(Ev, key_block)),
        keys_by_columns(Ops::packed_size(key_block, E)), queries_by_columns(query_words),
        grad_out_by_columns(grad_out_words), operand_transposed(Ops::transposed_buffer_size(query_block, key_block)),
        grad_scores_buffer(Ops::left_buffer_size(query_block, key_block)), dk(key_block * E),
        dv(key_block * Ev) {}

  // How many slots a task gets (1, repacked for every use, when query_slots do not fit), all empty.
  int64_t begin_task(int64_t query_slots, int64_t extra_bytes_per_slot = 0) {
    const int64_t per_slot = (query_words + grad_out_words) * int64_t(sizeof(Word)) + extra_bytes_per_slot;
    const int64_t count = query_slots * per_slot <= kQuerySlotBytes ? query_slots : 1;
    if (static_cast<int64_t>(queries_by_columns.size()) < count * query_words) {
      queries_by_columns.resize(count * query_words);
      grad_out_by_columns.resize(count * grad_out_words);
    }
    slots.reset(count);
    return count;
  }
  void load_keys(const T* k, const T* v, int64_t cols) {
    Ops::pack_rows(k, cols, E, E, keys_by_rows.data());
    Ops::pack_rows(v, cols, Ev, Ev, values_by_rows.data());
    Ops::pack_columns(k, cols, E, E, keys_by_columns.data());
    std::fill(dk.begin(), dk.begin() + cols * E, 0.0f);
    std::fill(dv.begin(), dv.begin() + cols * Ev, 0.0f);
  }
  // q: (rows, E), grad_out: (rows, Ev), contiguous: the query block of the slot.
  void load_queries(const T* q, const T* grad_out, int64_t rows, int64_t slot) {
    q_rows = q;
    do_rows = grad_out;
    const int64_t index = slots.index(slot);
    Word* q_slot = queries_by_columns.data() + index * query_words;
    Word* do_slot = grad_out_by_columns.data() + index * grad_out_words;
    q_packed = q_slot;
    do_packed = do_slot;
    if (slots.holds(slot)) return;
    Ops::pack_columns(q, rows, E, E, q_slot);
    Ops::pack_columns(grad_out, rows, Ev, Ev, do_slot);
    slots.mark_packed(slot);
  }
  void scores(int64_t rows, int64_t cols, float scale, float* out, int64_t ld, Diagonal diagonal = {}) {
    Ops::product(rows, cols, E, Ops::rows(q_rows, E), keys_by_rows.data(), scale, false, out, ld,
                 skip(diagonal, CausalSkip::kColumnsAfter));
  }
  void grad_probs(int64_t rows, int64_t cols, float* out, int64_t ld, Diagonal diagonal = {}) {
    Ops::product(rows, cols, Ev, Ops::rows(do_rows, Ev), values_by_rows.data(), 1.0f, false, out, ld,
                 skip(diagonal, CausalSkip::kColumnsAfter));
  }
  // dV (cols x Ev) += P^T dO
  void add_grad_values(int64_t rows, int64_t cols, const float* probs, int64_t ld, Diagonal diagonal = {}) {
    Ops::product(cols, Ev, rows, Ops::transposed(probs, rows, cols, ld, operand_transposed.data()),
                 do_packed, 1.0f, true, dv.data(), Ev, skip(diagonal, CausalSkip::kReductionBefore));
  }
  // dK (cols x E) += scale * dS^T Q
  void add_grad_keys(int64_t rows, int64_t cols, const float* grad_scores, int64_t ld, float scale,
                     Diagonal diagonal = {}) {
    Ops::product(cols, E, rows, Ops::transposed(grad_scores, rows, cols, ld, operand_transposed.data()),
                 q_packed, scale, true, dk.data(), E, skip(diagonal, CausalSkip::kReductionBefore));
  }
  // dq (rows x E) += scale * dS K
  void add_grad_queries(int64_t rows, int64_t cols, const float* grad_scores, int64_t ld, float scale, float* dq,
                        Diagonal diagonal = {}) {
    Ops::product(rows, E, cols, Ops::rounded(grad_scores, rows, cols, ld, grad_scores_buffer.data()),
                 keys_by_columns.data(), scale, true, dq, E, skip(diagonal, CausalSkip::kReductionAfter));
  }
  // Out: T, or the input dtype of the widening tiles below.
  template <typename Out>
  void store_key_grads(Out* grad_k, Out* grad_v, int64_t cols) const {
    narrow_scaled(dk.data(), 1.0f, cols * E, grad_k);  // x * 1 is x: a plain conversion
    narrow_scaled(dv.data(), 1.0f, cols * Ev, grad_v);
  }
};

#if defined(ATTNKERNELS_AMX_TILES)
// The forward's bfloat16 products on AMX (amx_tiles.h), on CPUs that have it, for head dims that are
// multiples of 32 (a query row holds whole reduction steps). The same roles as DotForwardTiles, with
// operands laid out for 32 x 32 blocks: the task's query rows copied with zero rows after them (a
// block reads up to 32 rows), the values padded with zero keys to a multiple of 32 (the reduction's
// step), the rounded probabilities in rows of that padded length.
struct AmxForwardTiles {
  using T = c10::BFloat16;
  using Ops = DotOps<T>;
  using Word = uint32_t;
  int64_t E, Ev, padded_keys = 0;
  const T* q_rows = nullptr;  // the task's query rows: the input's, or q_buffer
  ScratchBuffer<T> q_buffer, v_buffer, probs_buffer;
  ScratchBuffer<Word> keys_packed, values_packed;
  static constexpr int64_t kReadsPastDiagonal = kAmxReadsPastDiagonal;
  static constexpr bool kSkipsBehindDiagonal = true;
  static constexpr bool kRoundsInExpPass = true;  // see DotForwardTiles

  AmxForwardTiles(int64_t query_rows, int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), q_buffer((round_up(query_rows, kAmxRows) + kAmxRows) * E),
        v_buffer(round_up(key_block, kAmxDepth) * Ev),
        probs_buffer(round_up(query_block, kAmxRows) * round_up(key_block, kAmxDepth)),
        keys_packed(Ops::packed_size(E, key_block)), values_packed(Ops::packed_size(round_up(key_block, kAmxDepth), Ev)) {}

  // A task of whole 32-row blocks (its query blocks are multiples of 32 rows) is read where it lies;
  // else it is copied, and the rows after it (read by its last 32-row block, up to 32 past its end
  // when a query block is not a multiple of 32 rows) are zero.
  void load_queries(const T* q, int64_t rows) {
    if (rows % kAmxRows == 0) {
      q_rows = q;
      return;
    }
    std::copy(q, q + rows * E, q_buffer.begin());
    std::fill(q_buffer.begin() + rows * E, q_buffer.begin() + std::min(q_buffer.size(), (round_up(rows, kAmxRows) +
              kAmxRows) * E), T(0));
    q_rows = q_buffer.data();
  }
  // Values of whole reduction steps are packed where they lie; else copied with zero keys after them.
  void load_keys(const T* k, const T* v, int64_t cols) {
    padded_keys = round_up(cols, kAmxDepth);
    Ops::pack_rows(k, cols, E, E, keys_packed.data());
    const T* values = v;
    if (padded_keys != cols) {
      std::copy(v, v + cols * Ev, v_buffer.begin());
      std::fill(v_buffer.begin() + cols * Ev, v_buffer.begin() + padded_keys * Ev, T(0));
      values = v_buffer.data();
    }
    Ops::pack_columns(values, padded_keys, Ev, Ev, values_packed.data());
  }
  void scores(int64_t first, int64_t rows, int64_t cols, float scale, float* out, int64_t ld,
              Diagonal diagonal = {}) {
    amx_product(rows, cols, E, q_rows + first * E, E, keys_packed.data(), E / 2, scale, false, out, ld,
                skip(diagonal, CausalSkip::kColumnsAfter));
  }
  // With dropout: the float32 probabilities rounded into the rows the product reads.
  void add_values(int64_t rows, int64_t cols, const float* probs, int64_t ld, float* accum, Diagonal diagonal = {}) {
    round_rows(probs, rows, cols, ld, probs_buffer.data(), padded_keys);
    add_rounded_values(rows, cols, accum, diagonal);
  }
  float exp_pass_rounded(int64_t r, int64_t cols, const float* scores, int64_t visible, float shift, float to_log2) {
    T* row = probs_buffer.data() + r * padded_keys;
    const float sum = exp2_shifted_sum_rounded(scores, visible, shift, to_log2, reinterpret_cast<uint16_t*>(row));
    zero_rounded(row, visible, visible);
    return sum;
  }
  void zero_rounded_row(int64_t r, int64_t /*cols*/, int64_t visible) {
    zero_rounded(probs_buffer.data() + r * padded_keys, 0, visible);
  }
  void add_rounded_values(int64_t rows, int64_t /*cols*/, float* accum, Diagonal diagonal = {}) {
    amx_product(rows, Ev, padded_keys, probs_buffer.data(), padded_keys, values_packed.data(), padded_keys / 2, 1.0f,
                true, accum, Ev, skip(diagonal, CausalSkip::kReductionAfter));
  }

 private:
  // Zeros in [from, end) of a rounded row, end: as far past `visible` as the product reads.
  void zero_rounded(T* row, int64_t from, int64_t visible) const {
    const int64_t end = std::min(padded_keys, visible + kReadsPastDiagonal);
    if (from < end) std::fill(row + from, row + end, T(0));
  }
};

// The backward's bfloat16 products on AMX, for head dims (E and Ev) that are multiples of 32. dK and
// dV reduce over query rows: they are accumulated transposed (E x keys, Ev x keys: C's rows are the
// head dim), from Q^T and dO^T (the query block transposed once per task, in its slot) times P and
// dS packed as right operands, and transposed back once per key block. P and dS are rounded to
// bfloat16 for their products, as DotBackwardTiles rounds them.
struct AmxBackwardTiles {
  using T = c10::BFloat16;
  using Ops = DotOps<T>;
  using Word = uint32_t;
  int64_t E, Ev, query_rows, key_rows, cols_padded = 0, rows_padded = 0;
  // Per slot: the query block's q and dO rows (query_rows x E, x Ev, zero rows after the block) and
  // their transposes (E x query_rows, Ev x query_rows, zero columns after the block).
  AlignedVector<T> q_slots, do_slots, q_t_slots, do_t_slots;
  ScratchBuffer<T> rounded_grad;
  QuerySlots slots;
  const T *q_rows = nullptr, *do_rows = nullptr, *q_t = nullptr, *do_t = nullptr;
  ScratchBuffer<Word> keys_by_rows, values_by_rows, keys_by_columns, probs_packed, grad_packed;
  ScratchBuffer<float> dk_t, dv_t;  // E x key_rows, Ev x key_rows
  // Products without a causal skip read whole rows: the caller zeroes everything behind the diagonal.
  static constexpr int64_t kReadsPastDiagonal = std::numeric_limits<int64_t>::max();

  AmxBackwardTiles(int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), query_rows(round_up(query_block, kAmxRows)), key_rows(round_up(key_block, kAmxDepth)),
        rounded_grad(query_rows * key_rows), keys_by_rows(Ops::packed_size(E, key_block)),
        values_by_rows(Ops::packed_size(Ev, key_block)), keys_by_columns(Ops::packed_size(key_rows, E)),
        probs_packed(Ops::packed_size(query_rows, key_block)), grad_packed(Ops::packed_size(query_rows, key_block)),
        dk_t(E * key_rows), dv_t(Ev * key_rows) {}

  int64_t slot_words() const { return query_rows * (E + Ev); }
  int64_t begin_task(int64_t query_slots) {
    constexpr int64_t kSlotBytes = int64_t(16) << 20;
    const int64_t count = query_slots * 2 * slot_words() * int64_t(sizeof(T)) <= kSlotBytes ? query_slots : 1;
    if (static_cast<int64_t>(q_slots.size()) < count * query_rows * E) {
      q_slots.resize(count * query_rows * E);
      q_t_slots.resize(count * query_rows * E);
      do_slots.resize(count * query_rows * Ev);
      do_t_slots.resize(count * query_rows * Ev);
    }
    slots.reset(count);
    return count;
  }
  void load_keys(const T* k, const T* v, int64_t cols) {
    cols_padded = round_up(cols, kAmxDepth);
    Ops::pack_rows(k, cols, E, E, keys_by_rows.data());
    Ops::pack_rows(v, cols, Ev, Ev, values_by_rows.data());
    pack_pairs_from_columns(k, cols, E, E, keys_by_columns.data(), PairLayout::kPanels, cols_padded / 2);
    std::fill(dk_t.begin(), dk_t.end(), 0.0f);
    std::fill(dv_t.begin(), dv_t.end(), 0.0f);
  }
  void load_queries(const T* q, const T* grad_out, int64_t rows, int64_t slot) {
    rows_padded = round_up(rows, kAmxRows);
    const int64_t index = slots.index(slot);
    T* q_slot = q_slots.data() + index * query_rows * E;
    T* do_slot = do_slots.data() + index * query_rows * Ev;
    T* q_t_slot = q_t_slots.data() + index * query_rows * E;
    T* do_t_slot = do_t_slots.data() + index * query_rows * Ev;
    q_rows = q_slot;
    do_rows = do_slot;
    q_t = q_t_slot;
    do_t = do_t_slot;
    if (slots.holds(slot)) return;
    copy_padded(q, rows, E, q_slot, q_t_slot);
    copy_padded(grad_out, rows, Ev, do_slot, do_t_slot);
    slots.mark_packed(slot);
  }
  void scores(int64_t rows, int64_t cols, float scale, float* out, int64_t ld, Diagonal diagonal = {}) {
    amx_product(rows, cols, E, q_rows, E, keys_by_rows.data(), E / 2, scale, false, out, ld,
                skip(diagonal, CausalSkip::kColumnsAfter));
  }
  void grad_probs(int64_t rows, int64_t cols, float* out, int64_t ld, Diagonal diagonal = {}) {
    amx_product(rows, cols, Ev, do_rows, Ev, values_by_rows.data(), Ev / 2, 1.0f, false, out, ld,
                skip(diagonal, CausalSkip::kColumnsAfter));
  }
  // dV^T (Ev x cols) += dO^T P
  void add_grad_values(int64_t rows, int64_t cols, const float* probs, int64_t ld, Diagonal = {}) {
    pack_pairs_from_columns(probs, rows, cols, ld, probs_packed.data(), PairLayout::kPanels, rows_padded / 2);
    amx_product(Ev, cols, rows_padded, do_t, query_rows, probs_packed.data(), rows_padded / 2, 1.0f, true,
                dv_t.data(), key_rows);
  }
  // dK^T (E x cols) += scale * Q^T dS
  void add_grad_keys(int64_t rows, int64_t cols, const float* grad_scores, int64_t ld, float scale, Diagonal = {}) {
    pack_pairs_from_columns(grad_scores, rows, cols, ld, grad_packed.data(), PairLayout::kPanels, rows_padded / 2);
    amx_product(E, cols, rows_padded, q_t, query_rows, grad_packed.data(), rows_padded / 2, scale, true, dk_t.data(),
                key_rows);
  }
  // dq (rows x E) += scale * dS K
  void add_grad_queries(int64_t rows, int64_t cols, const float* grad_scores, int64_t ld, float scale, float* dq,
                        Diagonal diagonal = {}) {
    round_rows(grad_scores, rows, cols, ld, rounded_grad.data(), cols_padded);
    amx_product(rows, E, cols_padded, rounded_grad.data(), cols_padded, keys_by_columns.data(), cols_padded / 2,
                scale, true, dq, E, skip(diagonal, CausalSkip::kReductionAfter));
  }
  template <typename Out>
  void store_key_grads(Out* grad_k, Out* grad_v, int64_t cols) const {
    for (int64_t j = 0; j < cols; ++j) {
      for (int64_t e = 0; e < E; ++e) grad_k[j * E + e] = static_cast<Out>(dk_t[e * key_rows + j]);
      for (int64_t e = 0; e < Ev; ++e) grad_v[j * Ev + e] = static_cast<Out>(dv_t[e * key_rows + j]);
    }
  }

 private:
  // x (rows x width) into `rows_out` (query_rows x width, zero rows after `rows`) and its transpose
  // `columns_out` (width x query_rows, zero columns after `rows`).
  void copy_padded(const T* x, int64_t rows, int64_t width, T* rows_out, T* columns_out) const {
    std::copy(x, x + rows * width, rows_out);
    std::fill(rows_out + rows * width, rows_out + query_rows * width, T(0));
    for (int64_t e = 0; e < width; ++e) {
      T* column = columns_out + e * query_rows;
      for (int64_t i = 0; i < rows; ++i) column[i] = x[i * width + e];
      std::fill(column + rows, column + query_rows, T(0));
    }
  }
};
#endif

// float16 and bfloat16 inputs that have no register tiles of their own (float16 everywhere, bfloat16
// without AVX512-BF16 or with an odd head dimension) run on the float32 tiles: each block's rows are
// widened to float32 as they are loaded, as the BLAS path widens them, and everything after that is
// the float32 path (probabilities and score gradients stay float32). Against BLAS this keeps the
// causal skipping of the register tiles and the packing into panels the tiles read front to back.
template <typename scalar_t>
struct WideningForwardTiles : DotForwardTiles<float> {
  using Base = DotForwardTiles<float>;
  AlignedVector<float> q_buffer, k_buffer, v_buffer;

  WideningForwardTiles(int64_t query_rows, int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : Base(query_rows, query_block, key_block, E, Ev), q_buffer(query_rows * E), k_buffer(key_block * E),
        v_buffer(key_block * Ev) {}

  void load_queries(const scalar_t* q, int64_t rows) {
    Base::load_queries(rows_as_acc(q, 0, rows, E, q_buffer.data()), rows);
  }
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    Base::load_keys(rows_as_acc(k, 0, cols, E, k_buffer.data()), rows_as_acc(v, 0, cols, Ev, v_buffer.data()), cols);
  }
};

template <typename scalar_t>
struct WideningBackwardTiles : DotBackwardTiles<float> {
  using Base = DotBackwardTiles<float>;
  int64_t query_block;
  AlignedVector<float> q_buffer, do_buffer, k_buffer, v_buffer;  // q_buffer, do_buffer: per slot

  WideningBackwardTiles(int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : Base(query_block, key_block, E, Ev), query_block(query_block), q_buffer(query_block * E),
        do_buffer(query_block * Ev), k_buffer(key_block * E), v_buffer(key_block * Ev) {}

  // The slots keep the widened rows too (the products read them as left operands).
  int64_t begin_task(int64_t query_slots) {
    const int64_t count = Base::begin_task(query_slots, query_block * (E + Ev) * int64_t(sizeof(float)));
    if (static_cast<int64_t>(q_buffer.size()) < count * query_block * E) {
      q_buffer.resize(count * query_block * E);
      do_buffer.resize(count * query_block * Ev);
    }
    return count;
  }
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    Base::load_keys(rows_as_acc(k, 0, cols, E, k_buffer.data()), rows_as_acc(v, 0, cols, Ev, v_buffer.data()), cols);
  }
  void load_queries(const scalar_t* q, const scalar_t* grad_out, int64_t rows, int64_t slot) {
    const int64_t index = Base::slots.index(slot);
    float* q_rows_widened = q_buffer.data() + index * query_block * E;
    float* do_rows_widened = do_buffer.data() + index * query_block * Ev;
    if (!Base::slots.holds(slot)) {
      widen(q, rows * E, q_rows_widened);
      widen(grad_out, rows * Ev, do_rows_widened);
    }
    Base::load_queries(q_rows_widened, do_rows_widened, rows, slot);
  }
};

#endif

#if defined(ATTNKERNELS_DIRECT_TILES)
// f(std::integral_constant<int, rows>, first row, keys the group's last row sees) for each group of up to
// kDirectRows of the tile's rows that sees a key: a group's products run to its last row's diagonal.
template <typename F>
void for_direct_row_groups(int64_t rows, int64_t cols, Diagonal diagonal, F&& f) {
  static_assert(kDirectRows == 2 || kDirectRows == 4, "the cases below cover 1 to kDirectRows rows");
  for (int64_t r = 0; r < rows; r += kDirectRows) {
    const int64_t group = std::min<int64_t>(kDirectRows, rows - r);
    const int64_t seen = visible_columns(diagonal, r + group - 1, cols);
    if (seen == 0) continue;
    switch (group) {
      case 1: f(std::integral_constant<int, 1>{}, r, seen); break;
#if defined(ATTNKERNELS_CPU_AVX512)
      case 3: f(std::integral_constant<int, 3>{}, r, seen); break;
      case 4: f(std::integral_constant<int, 4>{}, r, seen); break;
#endif
      default: f(std::integral_constant<int, 2>{}, r, seen); break;
    }
  }
}

// The forward's products for a few query rows (direct_tiles.h): keys and values read where they lie,
// the query rows widened to float32 (and padded with zeros to whole vectors).
template <typename scalar_t>
struct DirectForwardTiles {
  static constexpr int64_t kReadsPastDiagonal = kDirectRows;  // a group of rows reads to its last row's diagonal
  static constexpr bool kSkipsBehindDiagonal = true;
  static constexpr bool kRoundsInExpPass = false;
  int64_t E, Ev, q_ld;
  AlignedVector<float> q_buffer;
  const scalar_t *k_rows = nullptr, *v_rows = nullptr;

  DirectForwardTiles(int64_t query_rows, int64_t /*query_block*/, int64_t /*key_block*/, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), q_ld(direct_padded(E)), q_buffer(query_rows * q_ld, 0.0f) {}

  void load_queries(const scalar_t* q, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) widen(q + r * E, E, q_buffer.data() + r * q_ld);
  }
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t) {
    k_rows = k;
    v_rows = v;
  }
  void scores(int64_t first, int64_t rows, int64_t cols, float scale, float* out, int64_t ld, Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      // The first group of rows prefetches the values that add_values reads next.
      direct_scores<decltype(kRows)::value>(q_buffer.data() + (first + r) * q_ld, q_ld, k_rows, E, seen, scale,
                                            out + r * ld, ld, r == 0 ? values_to_prefetch(v_rows, Ev, cols)
                                                                     : RowsToPrefetch{});
    });
  }
  void add_values(int64_t rows, int64_t cols, const float* probs, int64_t ld, float* accum, Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      direct_values<decltype(kRows)::value>(probs + r * ld, ld, v_rows, Ev, seen, accum + r * Ev);
    });
  }
};

// The backward's products for a few query rows: keys and values read where they lie, the query and
// output-gradient rows widened to float32 and padded, dK and dV accumulated key by key in float32
// rows padded to whole vectors.
template <typename scalar_t>
struct DirectBackwardTiles {
  static constexpr int64_t kReadsPastDiagonal = kDirectRows;
  int64_t E, Ev, q_ld, do_ld;
  AlignedVector<float> q_buffer, do_buffer, dk, dv;
  const scalar_t *k_rows = nullptr, *v_rows = nullptr;

  DirectBackwardTiles(int64_t query_block, int64_t key_block, int64_t E, int64_t Ev)
      : E(E), Ev(Ev), q_ld(direct_padded(E)), do_ld(direct_padded(Ev)), q_buffer(query_block * q_ld, 0.0f),
        do_buffer(query_block * do_ld, 0.0f), dk(key_block * q_ld), dv(key_block * do_ld) {}

  // Nothing is packed, so nothing is kept between the query blocks of a task.
  int64_t begin_task(int64_t) { return 1; }
  void load_keys(const scalar_t* k, const scalar_t* v, int64_t cols) {
    k_rows = k;
    v_rows = v;
    std::fill(dk.begin(), dk.begin() + cols * q_ld, 0.0f);
    std::fill(dv.begin(), dv.begin() + cols * do_ld, 0.0f);
  }
  void load_queries(const scalar_t* q, const scalar_t* grad_out, int64_t rows, int64_t /*slot*/) {
    for (int64_t r = 0; r < rows; ++r) {
      widen(q + r * E, E, q_buffer.data() + r * q_ld);
      widen(grad_out + r * Ev, Ev, do_buffer.data() + r * do_ld);
    }
  }
  void scores(int64_t rows, int64_t cols, float scale, float* out, int64_t ld, Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      // The first group of rows prefetches the values that grad_probs reads next.
      direct_scores<decltype(kRows)::value>(q_buffer.data() + r * q_ld, q_ld, k_rows, E, seen, scale, out + r * ld, ld,
                                            r == 0 ? values_to_prefetch(v_rows, Ev, cols) : RowsToPrefetch{});
    });
  }
  void grad_probs(int64_t rows, int64_t cols, float* out, int64_t ld, Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      direct_scores<decltype(kRows)::value>(do_buffer.data() + r * do_ld, do_ld, v_rows, Ev, seen, 1.0f, out + r * ld,
                                            ld);
    });
  }
  // dV (cols x Ev) += P^T dO
  void add_grad_values(int64_t rows, int64_t cols, const float* probs, int64_t ld, Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      direct_outer<decltype(kRows)::value>(probs + r * ld, ld, do_buffer.data() + r * do_ld, do_ld, do_ld, seen, 1.0f,
                                           dv.data(), do_ld);
    });
  }
  // dK (cols x E) += scale * dS^T Q
  void add_grad_keys(int64_t rows, int64_t cols, const float* grad_scores, int64_t ld, float scale,
                     Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      direct_outer<decltype(kRows)::value>(grad_scores + r * ld, ld, q_buffer.data() + r * q_ld, q_ld, q_ld, seen,
                                           scale, dk.data(), q_ld);
    });
  }
  // dq (rows x E, contiguous) += scale * dS K
  void add_grad_queries(int64_t rows, int64_t cols, const float* grad_scores, int64_t ld, float scale, float* dq,
                        Diagonal diagonal = {}) {
    for_direct_row_groups(rows, cols, diagonal, [&](auto kRows, int64_t r, int64_t seen) {
      direct_values<decltype(kRows)::value>(grad_scores + r * ld, ld, k_rows, E, seen, dq + r * E, scale);
    });
  }
  template <typename Out>
  void store_key_grads(Out* grad_k, Out* grad_v, int64_t cols) const {
    for (int64_t j = 0; j < cols; ++j) {
      narrow_scaled(dk.data() + j * q_ld, 1.0f, E, grad_k + j * E);  // x * 1 is x: a plain conversion
      narrow_scaled(dv.data() + j * do_ld, 1.0f, Ev, grad_v + j * Ev);
    }
  }
};

#endif

#if defined(ATTNKERNELS_DOT_TILES)
template <typename scalar_t>
constexpr bool kWidenedTilesFor = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// The element types the register tiles have: float32 (FMAs), and bfloat16 in the avx512 variant.
template <typename scalar_t>
constexpr bool kDotTilesFor = std::is_same_v<scalar_t, float>
#if defined(ATTNKERNELS_CPU_AVX512)
                              || std::is_same_v<scalar_t, c10::BFloat16>
#endif
    ;

// Whether the register tiles of this dtype serve inputs of this shape (else float16 and bfloat16 are
// widened to the float32 tiles, and float64 goes to BLAS).
template <typename scalar_t>
bool use_dot_tiles(const Shape& shape) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return kDotTilesFor<scalar_t> && shape.E % 2 == 0 && shape.Ev % 2 == 0 && bf16_dot_products_enabled();
  }
  return kDotTilesFor<scalar_t>;
}
#endif

#if defined(ATTNKERNELS_DIRECT_TILES)
// Query rows per head up to which the forward takes the direct products rather than packing keys
// and values for the register tiles. Measured (2 threads, 8 and 64 heads of 256 and 4096 keys, head
// dim 64, Zen 4): float32 and the widened types gain at 16 rows on AVX-512 (0.6-0.85x the packed
// path's time), float32 on AVX2 up to 8 (above, packing pays for its wider tiles); bfloat16 on the
// AVX512-BF16 dot products, twice as fast as FMAs, only up to 4.
template <typename scalar_t>
int64_t direct_most_queries(const Shape& shape) {
#if defined(ATTNKERNELS_DOT_TILES)
  if constexpr (kDotTilesFor<scalar_t> && !std::is_same_v<scalar_t, float>) {
    if (use_dot_tiles<scalar_t>(shape)) return 4;
  }
#endif
#if defined(ATTNKERNELS_CPU_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) return 8;
#endif
  return 16;
}
#endif

// The forward and backward tiles of one family.
template <typename Forward, typename Backward>
struct TileFamily {
  using ForwardTiles = Forward;
  using BackwardTiles = Backward;
};

// Calls run(TileFamily<...>{}) with the tiles that serve this dtype and shape, the one choice the
// forward and the backward share: the direct products for a few query rows, else the register tiles
// of the dtype, else float16 and bfloat16 widened to the float32 tiles, else (float64, or a build
// without vector tiles) BLAS.
template <typename scalar_t, typename Run>
void with_tiles(const Shape& shape, Run&& run) {
#if defined(ATTNKERNELS_DIRECT_TILES)
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (shape.L <= direct_most_queries<scalar_t>(shape)) {
      run(TileFamily<DirectForwardTiles<scalar_t>, DirectBackwardTiles<scalar_t>>{});
      return;
    }
  }
#endif
#if defined(ATTNKERNELS_AMX_TILES)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_dot_tiles<scalar_t>(shape) && amx_tiles_enabled() && shape.E % kAmxDepth == 0) {
      if (shape.Ev % kAmxDepth == 0) {
        run(TileFamily<AmxForwardTiles, AmxBackwardTiles>{});
      } else {
        run(TileFamily<AmxForwardTiles, DotBackwardTiles<scalar_t>>{});
      }
      return;
    }
  }
#endif
#if defined(ATTNKERNELS_DOT_TILES)
  if constexpr (kDotTilesFor<scalar_t>) {
    if (use_dot_tiles<scalar_t>(shape)) {
      run(TileFamily<DotForwardTiles<scalar_t>, DotBackwardTiles<scalar_t>>{});
      return;
    }
  }
  if constexpr (kWidenedTilesFor<scalar_t>) {
    run(TileFamily<WideningForwardTiles<scalar_t>, WideningBackwardTiles<scalar_t>>{});
    return;
  }
#endif
  run(TileFamily<BlasForwardTiles<scalar_t>, BlasBackwardTiles<scalar_t>>{});
}

// ----------------------------------------------------------------------------- forward

// Query blocks per forward task. A task packs each key block once for all of its query blocks, so
// more blocks per task pack less (the packing is a few percent of a float32 forward at head dim 64,
// more on AVX-512, whose products are faster); at least 4 tasks per thread keep the dynamic split
// of causal work balanced, and at most 4 blocks (1024 rows) keep the task's accumulators small.
inline int64_t forward_blocks_per_task(int64_t heads, int64_t query_blocks, int64_t threads) {
  constexpr int64_t kMostBlocks = 4;
  const int64_t for_balance = std::max<int64_t>(1, heads * query_blocks / (4 * std::max<int64_t>(1, threads)));
  return std::min({query_blocks, for_balance, kMostBlocks});
}

// The forward's tasks, in the order the threads take them: groups of blocks_per_task query blocks
// of a head, then the query blocks of the last heads one at a time, the costliest first (under a
// causal mask the last block sees the most keys). Threads that take tasks of a whole head each
// would end the call up to a task apart (on 2 cores a few percent of the call spent waiting); small
// tasks at the end let them finish together.
struct ForwardTasks {
  int64_t heads, query_blocks, blocks_per_task, groups_per_head, split_heads;

  ForwardTasks(int64_t heads, int64_t query_blocks, int64_t threads)
      : heads(heads), query_blocks(query_blocks),
        blocks_per_task(forward_blocks_per_task(heads, query_blocks, threads)),
        groups_per_head(ceil_div(query_blocks, blocks_per_task)),
        split_heads(blocks_per_task > 1 && threads > 1 ? std::min(heads, threads) : 0) {}

  int64_t count() const { return (heads - split_heads) * groups_per_head + split_heads * query_blocks; }

  struct Task {
    int64_t head, first_block, blocks;
  };
  Task operator[](int64_t task) const {
    const int64_t grouped = (heads - split_heads) * groups_per_head;
    if (task < grouped) {
      const int64_t first_block = (task % groups_per_head) * blocks_per_task;
      return {task / groups_per_head, first_block, std::min(blocks_per_task, query_blocks - first_block)};
    }
    const int64_t single = task - grouped;
    return {heads - split_heads + single % split_heads, query_blocks - 1 - single / split_heads, 1};
  }
};

template <typename scalar_t, typename Tiles>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask_tensor, const Shape& shape, double scale_d, bool is_causal,
                  double dropout_p, int64_t seed, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const MaskView<acc_t> mask(mask_tensor, shape);
  const DropoutMask dropout(seed, dropout_p);
  const bool use_dropout = dropout_p > 0;
  const acc_t keep_scale = use_dropout ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
  const ScoreUnits<acc_t> units(scale_d, mask.is_float());
  const auto [batch, q_heads, kv_heads, group, L, S, E, Ev] = shape;
  // Blocks no longer than the sequences, so that short ones get scratch buffers of their size.
  const int64_t Bq = std::clamp<int64_t>(L, 1, kForwardQueryBlock);
  // Causal products that cannot skip what the diagonal hides take key blocks as long as query blocks,
  // so that a task's query blocks see whole key blocks except the one the diagonal cuts.
  const bool causal_blocks = is_causal && !Tiles::kSkipsBehindDiagonal;
  const int64_t Bk = std::clamp<int64_t>(S, 1, causal_blocks ? Bq : kForwardKeyBlock);
  const ForwardTasks tasks(batch * q_heads, ceil_div(L, Bq), at::get_num_threads());
  const int64_t task_capacity = tasks.blocks_per_task * Bq;

  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // Tiles that round the probabilities for their products take them from the exp pass, unless
  // dropout comes between.
  bool rounded_in_exp_pass = false;
  if constexpr (Tiles::kRoundsInExpPass) rounded_in_exp_pass = !use_dropout;

  // accum, row_max and row_sum hold the online softmax of every query row of the task.
  struct Scratch {
    ScratchBuffer<acc_t> scores, accum, row_max, row_sum;
    Tiles tiles;
  };
  auto make_scratch = [&] {
    return Scratch{ScratchBuffer<acc_t>(Bq * Bk), ScratchBuffer<acc_t>(task_capacity * Ev),
                   ScratchBuffer<acc_t>(task_capacity), ScratchBuffer<acc_t>(task_capacity),
                   Tiles(task_capacity, Bq, Bk, E, Ev)};
  };
  parallel_tasks(tasks.count(), make_scratch, [&](int64_t task_index, Scratch& scratch) {
    auto& [scores, accum, row_max, row_sum, tiles] = scratch;
    const ForwardTasks::Task task = tasks[task_index];
    const int64_t bh = task.head;
    const int64_t task_row0 = task.first_block * Bq;
    const int64_t task_rows = std::min(task.blocks * Bq, L - task_row0);
    const int64_t kv = (bh / q_heads) * kv_heads + (bh % q_heads) / group;
    tiles.load_queries(q_data + (bh * L + task_row0) * E, task_rows);
    std::fill(row_max.begin(), row_max.end(), neg_inf);
    std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
    std::fill(accum.begin(), accum.end(), acc_t(0));
    // Causal: keys beyond the task's last row are hidden from every row.
    const int64_t task_key_end = is_causal ? std::min(S, task_row0 + task_rows) : S;
    for (int64_t col0 = 0; col0 < task_key_end; col0 += Bk) {
      // The key block is packed once for all of the task's query blocks that see it. A causal
      // block that sees only part of it takes it whole where the products skip what its diagonal
      // hides: each of its rows then has one softmax pass per key block, however far its own keys
      // reach. (Else the block takes what it sees, and the keys are packed again for a block that
      // sees more.)
      const int64_t task_cols = std::min(Bk, task_key_end - col0);
      int64_t loaded_cols = 0;
      for (int64_t first = 0; first < task_rows; first += Bq) {
        const int64_t row0 = task_row0 + first;
        const int64_t rows = std::min(Bq, task_rows - first);
        const int64_t key_end = is_causal ? std::min(S, row0 + rows) : S;
        if (col0 >= key_end) continue;
        const int64_t cols = causal_blocks ? std::min(task_cols, key_end - col0) : task_cols;
        if (hidden_and_inert(mask, shape, bh, kv, row0, rows, col0, cols, q_data, k_data, v_data, scale_d)) continue;
        if (cols != loaded_cols) {
          tiles.load_keys(k_data + (kv * S + col0) * E, v_data + (kv * S + col0) * Ev, cols);
          loaded_cols = cols;
        }
        acc_t* block_max = row_max.data() + first;
        acc_t* block_sum = row_sum.data() + first;
        acc_t* block_accum = accum.data() + first * Ev;
        const Diagonal diagonal = causal_diagonal(is_causal, row0, col0, cols);
        tiles.scores(first, rows, cols, units.scale, scores.data(), Bk, diagonal);
        if (mask.present()) mask.apply(bh, row0, rows, col0, cols, scores.data(), Bk);
        // Online softmax: rescale what was accumulated under the old row maximum. Scores behind
        // the causal diagonal are never read (they may not have been computed): the probabilities
        // there that the product reads are set to 0, which also keeps a NaN key there hidden, as
        // torch's fused kernels do.
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row = scores.data() + r * Bk;
          const int64_t visible = visible_columns(diagonal, r, cols);
          if (!rounded_in_exp_pass) zero_behind_diagonal(row, visible, cols, Tiles::kReadsPastDiagonal);
          const acc_t tile_max = max_of(row, visible);
          const acc_t new_max = std::isnan(tile_max) ? tile_max : std::max(block_max[r], tile_max);
          if (new_max == neg_inf) {  // every key so far is masked for this row
            if constexpr (Tiles::kRoundsInExpPass) {
              if (rounded_in_exp_pass) {
                tiles.zero_rounded_row(r, cols, visible);
                continue;
              }
            }
            std::fill(row, row + visible, acc_t(0));
            continue;
          }
          const acc_t correction = exp2_nonpositive((block_max[r] - new_max) * units.to_log2);
          acc_t tile_sum;
          if constexpr (Tiles::kRoundsInExpPass) {
            tile_sum = rounded_in_exp_pass ? tiles.exp_pass_rounded(r, cols, row, visible, new_max, units.to_log2)
                                           : exp2_shifted_sum(row, visible, new_max, units.to_log2);
          } else {
            tile_sum = exp2_shifted_sum(row, visible, new_max, units.to_log2);
          }
          block_sum[r] = block_sum[r] * correction + tile_sum;
          block_max[r] = new_max;
          if (correction != acc_t(1)) {
            acc_t* acc_row = block_accum + r * Ev;
#pragma omp simd
            for (int64_t e = 0; e < Ev; ++e) acc_row[e] *= correction;
          }
        }
        if (use_dropout) {
          const uint64_t first_element = static_cast<uint64_t>((bh * L + row0) * S + col0);
          apply_dropout(dropout, keep_scale, first_element, S, rows, std::min(cols, key_end - col0), scores.data(), Bk);
        }
        if constexpr (Tiles::kRoundsInExpPass) {
          if (rounded_in_exp_pass) {
            tiles.add_rounded_values(rows, cols, block_accum, diagonal);
            continue;
          }
        }
        tiles.add_values(rows, cols, scores.data(), Bk, block_accum, diagonal);
      }
    }
    for (int64_t r = 0; r < task_rows; ++r) {
      const acc_t sum = row_sum[r];
      // A row that attends to nothing (sum 0) gives 0 and lse -inf (torch gives 0, not NaN);
      // a NaN score makes the sum NaN, and that row must give NaN as torch does.
      const bool attended = !(sum == acc_t(0));
      const acc_t inverse = attended ? acc_t(1) / sum : acc_t(0);
      scalar_t* out_row = out_data + (bh * L + task_row0 + r) * Ev;
      const acc_t* acc_row = accum.data() + r * Ev;
      narrow_scaled(acc_row, inverse, Ev, out_row);
      lse_data[bh * L + task_row0 + r] = attended ? row_max[r] * units.to_natural + std::log(sum) : neg_inf;
    }
  });
}

}  // namespace

// The entry points (cpu_kernels.h) and the backward's body.
std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                 double dropout_p, bool is_causal, double scale,
                                                 const std::optional<at::Tensor>& dropout_seed) {
  const Shape shape = checked_shape(query, key, value);
  check_dropout(dropout_p);
  check_attention_mask(attn_mask, shape, query, at::toOpMathType(query.scalar_type()));
  TORCH_CHECK(!(is_causal && attn_mask.has_value()),
              "attnkernels::attention: attn_mask and is_causal=True cannot be used together");
  const int64_t seed = dropout_seed_of(dropout_seed, dropout_p);
  const at::ScalarType acc_type = at::toOpMathType(query.scalar_type());
  at::Tensor out = at::empty({shape.batch, shape.q_heads, shape.L, shape.Ev}, query.options());
  at::Tensor lse = at::empty({shape.batch, shape.q_heads, shape.L}, query.options().dtype(acc_type));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_cpu", [&] {
    with_tiles<scalar_t>(shape, [&](auto family) {
      using Tiles = typename decltype(family)::ForwardTiles;
      forward_impl<scalar_t, Tiles>(q, k, v, attn_mask, shape, scale, is_causal, dropout_p, seed, out, lse);
    });
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------- backward

template <typename scalar_t, typename Tiles>
void backward_impl(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask_tensor,
                   const at::Tensor& out, const at::Tensor& lse, const Shape& shape, double scale_d, bool is_causal,
                   double dropout_p, int64_t seed, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                   at::Tensor& grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const MaskView<acc_t> mask(mask_tensor, shape);
  const DropoutMask dropout(seed, dropout_p);
  const bool use_dropout = dropout_p > 0;
  const acc_t keep_scale = use_dropout ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
  const acc_t scale = static_cast<acc_t>(scale_d);
  const ScoreUnits<acc_t> units(scale_d, mask.is_float());
  const auto [batch, q_heads, kv_heads, group, L, S, E, Ev] = shape;
  // Blocks no longer than the sequences, so that short ones get scratch buffers of their size.
  const int64_t Bq = std::clamp<int64_t>(L, 1, kBackwardQueryBlock);
  const int64_t Bk = std::clamp<int64_t>(S, 1, kBackwardKeyBlock);
  const int64_t query_blocks = ceil_div(L, Bq), key_blocks = ceil_div(S, Bk);
  const int64_t rows_total = batch * q_heads * L;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  const scalar_t* grad_out_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const scalar_t* out_data = out.const_data_ptr<scalar_t>();
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();

  // delta[row] = sum_e dO * O - dlse: the row term of the softmax gradient,
  // dS = P * (dP - delta) (a gradient reaching lse adds P * dlse).
  std::vector<acc_t> delta(rows_total);
  const acc_t* grad_lse_data = grad_lse.has_value() ? grad_lse->const_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows_total, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t sum = dot_in<scalar_t, acc_t>(grad_out_data + row * Ev, out_data + row * Ev, Ev);
      delta[row] = sum - (grad_lse_data != nullptr ? grad_lse_data[row] : acc_t(0));
    }
  });

  // Work is split over (batch, kv head, share of the key blocks). With few
  // (batch, kv head) pairs the key blocks are shared out so that every core
  // works; each share then adds into its own dQ buffer, summed at the end.
  const int64_t pairs = batch * kv_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t shares = std::max<int64_t>(1, std::min(key_blocks, ceil_div(2 * threads, pairs)));
  const bool dq_in_place = shares == 1 && !convert;
  at::Tensor dq_accum = dq_in_place ? grad_q.zero_()
                                    : at::zeros({shares, batch, q_heads, L, E}, q.options().dtype(
                                                                                     c10::CppTypeToScalarType<acc_t>::value));
  acc_t* dq_data = dq_accum.mutable_data_ptr<acc_t>();
  scalar_t* grad_k_data = grad_k.mutable_data_ptr<scalar_t>();
  scalar_t* grad_v_data = grad_v.mutable_data_ptr<scalar_t>();
  acc_t* grad_mask_data = grad_mask.defined() ? grad_mask.mutable_data_ptr<acc_t>() : nullptr;

  struct Scratch {
    ScratchBuffer<acc_t> probs, grad_probs;
    Tiles tiles;
  };
  auto make_scratch = [&] {
    return Scratch{ScratchBuffer<acc_t>(Bq * Bk), ScratchBuffer<acc_t>(Bq * Bk), Tiles(Bq, Bk, E, Ev)};
  };
  parallel_tasks(pairs * shares, make_scratch, [&](int64_t task, Scratch& scratch) {
    auto& [probs, grad_probs, tiles] = scratch;
    {
      const int64_t kv = task / shares;  // b * kv_heads + hkv
      const int64_t share = task % shares;
      const int64_t b = kv / kv_heads, hkv = kv % kv_heads;
      acc_t* dq_share = dq_data + share * batch * q_heads * L * E;
      // One query slot per query block of each query head of the kv head: packed once per task
      // when the task has more than one key block (and the slots fit).
      const bool several_key_blocks = share + shares < key_blocks;
      tiles.begin_task(several_key_blocks ? group * query_blocks : 1);
      // Key blocks share, share + shares, ...: interleaved, so that causal work is balanced.
      for (int64_t key_block = share; key_block < key_blocks; key_block += shares) {
        const int64_t col0 = key_block * Bk;
        const int64_t cols = std::min(Bk, S - col0);
        tiles.load_keys(k_data + (kv * S + col0) * E, v_data + (kv * S + col0) * Ev, cols);
        for (int64_t hq = hkv * group; hq < (hkv + 1) * group; ++hq) {
          const int64_t bh = b * q_heads + hq;
          // Causal: rows before col0 see none of these keys.
          const int64_t first_block = is_causal ? std::min(query_blocks, col0 / Bq) : 0;
          for (int64_t query_block = first_block; query_block < query_blocks; ++query_block) {
            const int64_t row0 = query_block * Bq;
            const int64_t rows = std::min(Bq, L - row0);
            if (is_causal && row0 + rows - 1 < col0) continue;
            // A hidden tile also matters to rows whose lse, delta or dO is not finite (0 * NaN).
            if (hidden_and_inert(mask, shape, bh, kv, row0, rows, col0, cols, q_data, k_data, v_data, scale_d) &&
                gradient_rows_finite(lse_data, delta.data(), grad_out_data, bh * L + row0, rows, Ev)) {
              continue;
            }
            tiles.load_queries(q_data + (bh * L + row0) * E, grad_out_data + (bh * L + row0) * Ev, rows,
                               (hq - hkv * group) * query_blocks + query_block);
            // P = exp(scale * Q K^T + mask - lse), through scores in the units of ScoreUnits
            const Diagonal diagonal = causal_diagonal(is_causal, row0, col0, cols);
            tiles.scores(rows, cols, units.scale, probs.data(), Bk, diagonal);
            if (mask.present()) mask.apply(bh, row0, rows, col0, cols, probs.data(), Bk);
            // Behind the causal diagonal, what the products read of P and dS is set to 0 (all of dS when
            // it is the mask's gradient too).
            const int64_t zeroed = grad_mask_data != nullptr ? cols : Tiles::kReadsPastDiagonal;
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* row = probs.data() + r * Bk;
              const int64_t visible = visible_columns(diagonal, r, cols);
              zero_behind_diagonal(row, visible, cols, zeroed);
              const acc_t row_lse = lse_data[bh * L + row0 + r];
              if (row_lse == neg_inf) {  // a fully masked row has no gradient
                std::fill(row, row + visible, acc_t(0));
                continue;
              }
              exp2_shifted_sum(row, visible, row_lse * units.per_natural, units.to_log2);
            }
            // dP = dO V^T, through the dropout mask when there is one.
            tiles.grad_probs(rows, cols, grad_probs.data(), Bk, diagonal);
            const uint64_t first = static_cast<uint64_t>((bh * L + row0) * S + col0);
            if (use_dropout) apply_dropout(dropout, keep_scale, first, S, rows, cols, grad_probs.data(), Bk);
            // dS = P * (dP - delta), computed in place over grad_probs; 0 behind the causal diagonal
            // (as far as it is read), where dP may not have been computed.
            for (int64_t r = 0; r < rows; ++r) {
              const acc_t row_delta = delta[bh * L + row0 + r];
              const acc_t* p = probs.data() + r * Bk;
              acc_t* g = grad_probs.data() + r * Bk;
              const int64_t visible = visible_columns(diagonal, r, cols);
#pragma omp simd
              for (int64_t c = 0; c < visible; ++c) g[c] = p[c] * (g[c] - row_delta);
              zero_behind_diagonal(g, visible, cols, zeroed);
            }
            // dV += (P after dropout)^T dO
            if (use_dropout) apply_dropout(dropout, keep_scale, first, S, rows, cols, probs.data(), Bk);
            tiles.add_grad_values(rows, cols, probs.data(), Bk, diagonal);
            if (grad_mask_data != nullptr) {
              for (int64_t r = 0; r < rows; ++r) {
                std::copy(grad_probs.data() + r * Bk, grad_probs.data() + r * Bk + cols,
                          grad_mask_data + (bh * L + row0 + r) * S + col0);
              }
            }
            tiles.add_grad_keys(rows, cols, grad_probs.data(), Bk, scale, diagonal);
            tiles.add_grad_queries(rows, cols, grad_probs.data(), Bk, scale, dq_share + (bh * L + row0) * E,
                                   diagonal);
          }
        }
        tiles.store_key_grads(grad_k_data + (kv * S + col0) * E, grad_v_data + (kv * S + col0) * Ev, cols);
      }
    }
  });
  if (!dq_in_place) {
    // One share converts as it is (a sum over one share would be a reduction and a buffer more).
    grad_q.copy_(shares == 1 ? dq_accum.select(0, 0) : dq_accum.sum(0));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& attn_mask, const at::Tensor& out,
    const at::Tensor& lse, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& dropout_seed, std::array<bool, 4> output_mask) {
  const Shape shape = checked_shape(query, key, value);
  check_dropout(dropout_p);
  check_attention_mask(attn_mask, shape, query, at::toOpMathType(query.scalar_type()));
  const int64_t seed = dropout_seed_of(dropout_seed, dropout_p);
  const at::ScalarType acc_type = at::toOpMathType(query.scalar_type());
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({shape.batch, shape.q_heads, shape.L,
                                                                                  shape.Ev}),
              "attnkernels::attention_backward: expected grad_out and out of shape (B, Hq, L, Ev), got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({shape.batch, shape.q_heads, shape.L}) && lse.scalar_type() == acc_type,
              "attnkernels::attention_backward: expected lse of shape (B, Hq, L) and dtype ", acc_type, ", got ",
              lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(!grad_lse.has_value() || (grad_lse->sizes() == lse.sizes() && grad_lse->scalar_type() == acc_type),
              "attnkernels::attention_backward: expected grad_lse like lse");
  const bool want_mask_grad = output_mask[3] && attn_mask.has_value();
  TORCH_CHECK(!want_mask_grad || attn_mask->scalar_type() != at::kBool,
              "attnkernels::attention_backward: a bool attn_mask has no gradient");
  // Every gradient is computed (dQ needs the same tiles as dK, dV); unrequested ones return empty.
  // backward_impl writes every element of dQ, dK and dV (zeroing dQ itself where it adds into it),
  // so they are zero-filled only when there is nothing to compute.
  const bool any_work = shape.batch * shape.q_heads * shape.L > 0 && shape.S > 0;
  const auto gradient_like = [&](const at::Tensor& input) {
    return any_work ? at::empty(input.sizes(), input.options()) : at::zeros(input.sizes(), input.options());
  };
  at::Tensor grad_q = gradient_like(query), grad_k = gradient_like(key), grad_v = gradient_like(value);
  at::Tensor grad_mask = want_mask_grad
                             ? at::zeros({shape.batch, shape.q_heads, shape.L, shape.S}, query.options().dtype(acc_type))
                             : at::Tensor();
  if (any_work) {
    const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
    const at::Tensor go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
    std::optional<at::Tensor> gl;
    if (grad_lse.has_value()) gl = grad_lse->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_backward_cpu", [&] {
      with_tiles<scalar_t>(shape, [&](auto family) {
        using Tiles = typename decltype(family)::BackwardTiles;
        backward_impl<scalar_t, Tiles>(go, gl, q, k, v, attn_mask, o, l, shape, scale, is_causal, dropout_p, seed,
                                       grad_q, grad_k, grad_v, grad_mask);
      });
    });
  }
  auto empty = [&](bool wanted, const at::Tensor& t) { return wanted ? t : t.new_empty({0}); };
  return {empty(output_mask[0], grad_q), empty(output_mask[1], grad_k), empty(output_mask[2], grad_v),
          want_mask_grad ? grad_mask : query.new_empty({0}, query.options().dtype(acc_type))};
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
