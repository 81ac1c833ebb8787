// CPU executor of a merge plan: the kernel behind `safa::merge_cpp_`.
//
// The plan contract (what a row means) is documented once, in safa_kernels/plan.py; this
// file only executes it. Tensors arrive canonical and 4-D with arbitrary strides:
//   out (D, O, Ld, I), src (S, O, Ls, I) or undefined (= out, in-place sync),
//   reference (O, window, I), index int32 (P, 1 + K + T), weight float64 (P, K),
//   runs int32 (P, 6) or undefined: row r stands for the count x rows cells at positions
//   p + j * step + i * row_stride (j < count, i < rows; each operand has its own row stride:
//   runs[r] = (count, step, rows, src_row_stride, out_row_stride, ref_row_stride)), a grid's plan;
//   undefined: every row one cell, a strip's plan.
//
// The work is memory-bound, so the loop is shaped around memory traffic:
//  * plan rows are decoded once per call, a block at a time, and the block is then
//    applied plane by plane (one outer index at a time), so every operand is walked as a
//    few sequential streams rather than O far-apart lines per row;
//  * consecutive copy rows whose sources and targets all advance by one column are
//    executed as one run, so a view's span of the long axis moves as one memcpy per outer
//    index when the long axis is dense (stitch and gather are almost entirely such runs);
//    rows with one source and one target (every swap and gather plan) take a short decoder;
//  * rows with one source of weight 1 are bitwise copies (memcpy or fixed-size moves),
//    never x * 1.0; one source of another weight (an adjoint plan) is multiplied; a lone
//    column (the alternating overlap columns of swap_interval 1) is one move of a size
//    known at compile time, not a general memcpy;
//  * a run row (a grid's plan: a tile's span of one canvas row, repeated over a band of canvas
//    rows) is one copy job, or one weighted sum per canvas row over the run's cells,
//    vectorised along the run when inner is 1 (an image latent: a cell is one element per
//    channel); a swap's two alternating runs over a column overlap are one interleave job;
//  * rows are independent (they write disjoint cells, and every row reads only cells of
//    its own column of J), so chunks of rows run in parallel with no synchronisation.
//
// Deliberately includes only ATen/ATen.h, ATen/Parallel.h and torch/library.h (not
// torch/extension.h, which pulls in pybind11 and triples the build time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "merge_checks.h"

namespace safa {
namespace {


// Half and bfloat16 accumulate in float, float64 in double (the contract of plan.py). The
// plan's float64 weights are rounded once to this type: float32 weights for every dtype
// but float64, whose means are then exact to float64.
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };

constexpr int64_t kRunColumns = 6;  // a grid plan's runs row: plan.RUN_COLUMNS

// Division of a plan position (an int32 >= 0) by a long size, by a multiplication (Lemire's
// fastmod, exact for every 32-bit dividend and divisor): a hardware 64-bit divide takes tens
// of cycles, and decoding a grid's run row divides twice per operand; that was a third of a
// stitch swap's time on the SD 2048 x 2048 grid (docs/kernels.md, section 8).
class PositionDivider {
 public:
  explicit PositionDivider(int64_t divisor)
      : divisor_(divisor), multiplier_(divisor > 1 && divisor < (int64_t{1} << 32)
                                           ? UINT64_MAX / static_cast<uint64_t>(divisor) + 1 : 0) {}
  // pos / divisor for 0 <= pos < 2^31 (divisor >= 1).
  int64_t quotient(int64_t pos) const {
    if (multiplier_ == 0) return divisor_ == 1 ? pos : 0;  // 1, or >= 2^32: past every int32 position
    return static_cast<int64_t>((static_cast<unsigned __int128>(multiplier_) * static_cast<uint64_t>(pos)) >> 64);
  }
  int64_t remainder(int64_t pos) const { return pos - quotient(pos) * divisor_; }

 private:
  int64_t divisor_;
  uint64_t multiplier_;
};

// A canonical 4-D operand: base pointer and element strides.
template <typename T>
struct Operand {
  T* data;
  int64_t long_size;  // columns per view: a flat plan position p is view p / long_size, column p % long_size
  int64_t view_stride, outer_stride, long_stride, inner_stride;
  PositionDivider by_long;

  // The cell of flat plan position `pos` (a valid one: checked) at outer index 0, inner index 0.
  T* cell(int64_t pos) const {
    const int64_t view = by_long.quotient(pos);
    return data + view * view_stride + (pos - view * long_size) * long_stride;
  }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.size(2), t.stride(0), t.stride(1), t.stride(2), t.stride(3),
          PositionDivider(std::max<int64_t>(1, t.size(2)))};
}

// Runtime parity of a reference swap along an axis inside O (axis_part 1) or I (axis_part 2);
// axis_part 0 means "always" (the long-axis parity is already resolved into the plan).
struct Parity {
  int64_t axis_part, div, size, interval;
  bool takes(int64_t x) const { return ((x / div) % size / interval) % 2 == 1; }
};

// Everything one row needs, decoded once from the plan.
template <typename T>
struct Row {
  using Acc = typename Accumulate<T>::type;
  int32_t ref_col;
  bool copy;                // one source of weight exactly 1: a bitwise copy (the plan contract, plan.py)
  int64_t num_sources = 0, num_targets = 0;
  // The row's cells (plan.py, runs): positions p + j * step + i * row stride, j < count, i < rows.
  int64_t count = 1, step = 1, rows = 1, src_row = 0, out_row = 0, ref_row = 0;
  const T** sources;        // cell(pos) of each valid source (length num_sources)
  Acc* weights;             // their weights, in the accumulation type
  T** targets;              // cell(pos) of each valid target
};

// A run of `columns` copy rows (see copy_run_length), for one target, at outer index 0:
// column c is at from + c * step long-axis strides. (Kept to 32 bytes: a strip's block of
// jobs is walked once per outer index, 2,048 times per call for an SD panorama.)
template <typename T>
struct CopyJob {
  const T* from;
  T* to;
  int64_t columns, step;
};

// A grid's run row, for one target, at outer index 0: column c of canvas row i is at
// from + c * step long-axis strides + i * from_row elements (to + ... + i * to_row likewise).
template <typename T>
struct RunJob {
  const T* from;
  T* to;
  int64_t columns, step, rows, from_row, to_row;
  // Set: an interleave of two runs of step 2 whose targets alternate (a swap's overlap at
  // swap_interval 1): target column c (< columns, contiguous, step 1) takes from + c when c is
  // even and from_odd + (c - 1) when odd, in long-axis strides.
  const T* from_odd = nullptr;
};

template <typename T>
class PlanExecutor {
  using Acc = typename Accumulate<T>::type;
  using CopyJob = safa::CopyJob<T>;
  using RunJob = safa::RunJob<T>;
  // Inner elements handled per accumulation tile: a stack array the compiler keeps in
  // vector registers / L1, so the k-loop of a weighted row vectorises over i.
  static constexpr int64_t kTile = 64;
  static constexpr int64_t kBlockBytes = 65536;

 public:
  PlanExecutor(const at::Tensor& out, const at::Tensor& src, const at::Tensor& reference,
               const at::Tensor& index, const at::Tensor& weight, Parity parity, const at::Tensor& runs)
      : out_(operand<T>(out)), src_(src.defined() ? operand<T>(src) : out_),
        outer_(out.size(1)), inner_(out.size(3)),
        K_(weight.size(1)), T_(index.size(1) - 1 - weight.size(1)),
        index_(index.data_ptr<int32_t>()), weight_(weight.data_ptr<double>()), parity_(parity),
        runs_(runs.defined() ? runs.data_ptr<int32_t>() : nullptr) {
    if (reference.defined()) {
      ref_ = reference.data_ptr<T>();
      ref_outer_stride_ = reference.stride(0);
      ref_long_stride_ = reference.stride(1);
      ref_inner_stride_ = reference.stride(2);
    }
    // A size-1 inner axis has no meaningful stride: treat it as dense.
    src_inner_ = inner_ == 1 ? 1 : src_.inner_stride;
    out_inner_ = inner_ == 1 ? 1 : out_.inner_stride;
    ref_inner_ = inner_ == 1 ? 1 : ref_inner_stride_;
    // A block spans ~64 KB of each operand's plane (measured on AudioLDM latents: 16 KB to
    // 1 MB are within noise of each other; row-by-row, i.e. no blocks, is 2-5x slower).
    block_rows_ = std::max<int64_t>(16, kBlockBytes / (inner_ * static_cast<int64_t>(sizeof(T))));
  }

  // Execute rows [begin, end): called once per parallel chunk.
  //
  // Rows are decoded a block at a time, then the block is applied one outer index at a
  // time. For a fixed outer index the block's cells are neighbours in memory, so each
  // operand is read and written as a few sequential streams; applying row by row instead
  // would touch O far-apart lines per row (O streams per operand, with power-of-two
  // strides that alias in the caches), which is several times slower once the latent no
  // longer fits in the last-level cache.
  void run(int64_t begin, int64_t end) const {
    // Rows per block: at most block_rows_ (columns per block, each row has one or more) and at
    // most the chunk's rows. The scratch is allocated per call: sized by the chunk, a small plan
    // (a grid's runs, a short layout) does not pay for a full block of it.
    const int64_t capacity = std::min(block_rows_, end - begin);
    std::vector<Row<T>> block(capacity);
    std::vector<const T*> sources(capacity * K_);
    std::vector<Acc> weights(capacity * K_);
    std::vector<T*> targets(capacity * T_);
    std::vector<int64_t> target_pos(T_);
    std::vector<CopyJob> copies;
    std::vector<RunJob> run_jobs;  // a grid's plan: its copy rows
    (runs_ != nullptr ? run_jobs.reserve(capacity * T_) : copies.reserve(capacity * T_));
    for (int64_t b = 0; b < capacity; ++b) {
      block[b].sources = sources.data() + b * K_;
      block[b].weights = weights.data() + b * K_;
      block[b].targets = targets.data() + b * T_;
    }
    for (int64_t r = begin; r < end;) {
      // Decode: copy rows become flat (from, to, columns) jobs; other rows stay rows.
      int64_t rows = 0, columns_in_block = 0;
      copies.clear();
      run_jobs.clear();
      while (columns_in_block < block_rows_ && r < end) {
        Row<T>& row = block[rows];
        const int32_t* entry = index_ + r * (1 + K_ + T_);
        if (runs_ != nullptr) {  // a grid's plan: the plan grouped the runs, one job or row each
          const int32_t* run = runs_ + kRunColumns * r;
          if (K_ == 1 && T_ == 1 && entry[0] < 0 && entry[1] >= 0 && entry[2] >= 0 && weight(r) == Acc(1)) {
            queue_run(entry[1], entry[2], run, run_jobs);
            ++r;
            columns_in_block += int64_t{run[0]} * run[2];
            continue;
          }
          decode(r, entry, row, target_pos.data());
          row.count = run[0];
          row.step = run[1];
          row.rows = run[2];
          row.src_row = run[3];
          row.out_row = run[4];
          row.ref_row = run[5];
          if (row.ref_col < 0 && row.copy) {
            for (int64_t t = 0; t < row.num_targets; ++t)
              if (row.targets[t] != row.sources[0])
                run_jobs.push_back({row.sources[0], row.targets[t], row.count, row.step, row.rows,
                                    row.src_row * src_.long_stride, row.out_row * out_.long_stride});
          } else {
            ++rows;
          }
          ++r;
          columns_in_block += row.count * row.rows;
          continue;
        }
        if (const int64_t columns = single_copy_run(entry, r, end, copies)) {
          r += columns;
          columns_in_block += columns;
          continue;
        }
        decode(r, entry, row, target_pos.data());
        if (row.ref_col < 0 && row.copy) {
          const int64_t columns = copy_run_length(entry, target_pos.data(), row.num_targets, r, end);
          for (int64_t t = 0; t < row.num_targets; ++t)
            if (row.targets[t] != row.sources[0])  // a copy onto itself changes nothing
              copies.push_back({row.sources[0], row.targets[t], columns, 1});
          r += columns;
          columns_in_block += columns;
        } else {
          ++rows;
          ++r;
          ++columns_in_block;
        }
      }
      for (int64_t o = 0; o < outer_; ++o) {
        if (runs_ != nullptr) {
          copy_jobs(run_jobs, o);
        } else {
          copy_jobs(copies, o);
        }
        for (int64_t b = 0; b < rows; ++b) apply_row(block[b], o);
      }
    }
  }

 private:
  // Plan weight number `flat`, rounded once to the accumulation type.
  Acc weight(int64_t flat) const { return static_cast<Acc>(weight_[flat]); }

  // A plan of one source and one target per row (K = T = 1): if row r is a plain copy,
  // queue the run of copies that starts there and return its length in columns; else 0.
  // The general decode + copy_run_length below do the same for any K and T, but their loops
  // cost more per row than copying one 64-byte column does.
  int64_t single_copy_run(const int32_t* entry, int64_t r, int64_t end, std::vector<CopyJob>& copies) const {
    // A copy has weight exactly 1; an adjoint plan's single source of another weight multiplies.
    if (K_ != 1 || T_ != 1 || entry[0] >= 0 || entry[1] < 0 || entry[2] < 0 || weight(r) != Acc(1)) return 0;
    const int32_t source = entry[1], target = entry[2];
    const int64_t room = std::min({src_.long_size - source % src_.long_size,
                                   out_.long_size - target % out_.long_size, end - r});
    int64_t n = 1;
    while (n < room && entry[3 * n] < 0 && entry[3 * n + 1] == source + n && entry[3 * n + 2] == target + n &&
           weight(r + n) == Acc(1))
      ++n;
    const T* from = src_.cell(source);
    T* to = out_.cell(target);
    if (from != to) copies.push_back({from, to, n, 1});  // a copy onto itself changes nothing
    return n;
  }

  // Queue the copy of a grid's run row with one source and one target (stitch and the
  // in-place swap of a grid without a corner: K = T = 1). The two runs of step 2 that a swap's
  // overlap splits into at swap_interval 1 come one after the other in the plan (the heads of
  // two neighbouring cells); their targets interleave, so they merge into one job that writes
  // the overlap's span of the canvas row in one pass instead of two strided ones.
  void queue_run(int32_t source, int32_t target, const int32_t* run, std::vector<RunJob>& copies) const {
    const T* from = src_.cell(source);
    T* to = out_.cell(target);
    if (from == to) return;  // a copy onto itself changes nothing
    const RunJob job{from, to, run[0], run[1], run[2], run[3] * src_.long_stride, run[4] * out_.long_stride};
    if (job.step == 2 && !copies.empty()) {
      RunJob& even = copies.back();
      if (even.step == 2 && even.from_odd == nullptr && to == even.to + out_.long_stride &&
          (even.columns == job.columns || even.columns == job.columns + 1) && even.rows == job.rows &&
          (job.rows == 1 || (even.from_row == job.from_row && even.to_row == job.to_row))) {
        even.from_odd = from;
        even.columns += job.columns;
        return;
      }
    }
    copies.push_back(job);
  }

  void decode(int64_t r, const int32_t* entry, Row<T>& row, int64_t* target_pos) const {
    row.ref_col = entry[0];
    row.count = row.step = row.rows = 1;
    row.src_row = row.out_row = row.ref_row = 0;
    row.num_sources = 0;
    for (int64_t k = 0; k < K_; ++k) {
      const int32_t pos = entry[1 + k];
      if (pos < 0) continue;  // padding
      row.sources[row.num_sources] = src_.cell(pos);
      row.weights[row.num_sources] = weight(r * K_ + k);
      ++row.num_sources;
    }
    row.copy = row.num_sources == 1 && row.weights[0] == Acc(1);
    row.num_targets = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const int32_t pos = entry[1 + K_ + t];
      if (pos < 0) continue;
      target_pos[row.num_targets] = pos;
      row.targets[row.num_targets++] = out_.cell(pos);
    }
  }

  // How many rows from r (at most end - r) form one run of plain copies: row r + n copies
  // from source position + n to every target position + n, all within the same view.
  int64_t copy_run_length(const int32_t* entry, const int64_t* target_pos, int64_t num_targets,
                          int64_t r, int64_t end) const {
    const int64_t width = 1 + K_ + T_;
    int32_t source_pos = -1;
    for (int64_t k = 0; k < K_ && source_pos < 0; ++k) source_pos = entry[1 + k];
    int64_t room = src_.long_size - source_pos % src_.long_size;  // columns left in its view
    for (int64_t t = 0; t < num_targets; ++t)
      room = std::min(room, out_.long_size - target_pos[t] % out_.long_size);
    room = std::min(room, end - r);
    int64_t n = 1;
    for (; n < room; ++n) {
      const int32_t* next = entry + n * width;
      if (next[0] >= 0) break;
      // Same shape: the first source advanced by n with weight 1, no other source, targets
      // advanced by n.
      int64_t k = 0, found = 0;
      for (; k < K_; ++k) {
        const int32_t pos = next[1 + k];
        if (pos < 0) continue;
        if (found++ || pos != source_pos + n || weight((r + n) * K_ + k) != Acc(1)) break;
      }
      if (k < K_ || found != 1) break;
      int64_t t = 0, seen = 0;
      for (; t < T_; ++t) {
        const int32_t pos = next[1 + K_ + t];
        if (pos < 0) continue;
        if (seen >= num_targets || pos != target_pos[seen] + n) break;
        ++seen;
      }
      if (t < T_ || seen != num_targets) break;
    }
    return n;
  }

  // Every copy job of a block at outer index o: the hot loop of swap, gather and stitch.
  template <typename Job>
  void copy_jobs(const std::vector<Job>& jobs, int64_t o) const {
    const int64_t from_offset = o * src_.outer_stride, to_offset = o * out_.outer_stride;
    const bool dense_column = src_inner_ == 1 && out_inner_ == 1;
    if (dense_column) {
      switch (sizeof(T) * inner_) {  // the column sizes of real latents (AudioLDM fp32: 64 bytes)
        case 2: return copy_dense_jobs<2>(jobs, from_offset, to_offset);
        case 4: return copy_dense_jobs<4>(jobs, from_offset, to_offset);
        case 8: return copy_dense_jobs<8>(jobs, from_offset, to_offset);
        case 16: return copy_dense_jobs<16>(jobs, from_offset, to_offset);
        case 32: return copy_dense_jobs<32>(jobs, from_offset, to_offset);
        case 64: return copy_dense_jobs<64>(jobs, from_offset, to_offset);
        case 128: return copy_dense_jobs<128>(jobs, from_offset, to_offset);
        default: break;
      }
    }
    const bool dense_run = dense_column && src_.long_stride == inner_ && out_.long_stride == inner_;
    if constexpr (std::is_same_v<Job, RunJob>) {
      for (const RunJob& job : jobs)
        for (int64_t i = 0; i < job.rows; ++i) {
          const T* from = job.from + from_offset + i * job.from_row;
          T* to = job.to + to_offset + i * job.to_row;
          if (job.from_odd != nullptr) {
            const T* odd = job.from_odd + from_offset + i * job.from_row;
            for (int64_t c = 0; c < job.columns; ++c)
              copy_inner(to + c * out_.long_stride,
                         c % 2 ? odd + (c - 1) * src_.long_stride : from + c * src_.long_stride, src_inner_);
          } else {
            for (int64_t c = 0; c < job.columns; ++c)
              copy_inner(to + c * job.step * out_.long_stride, from + c * job.step * src_.long_stride, src_inner_);
          }
        }
    } else {
      for (const CopyJob& job : jobs) {
        const T* from = job.from + from_offset;
        T* to = job.to + to_offset;
        if (dense_column && (job.columns == 1 || (dense_run && job.step == 1))) {
          copy_bytes(to, from, sizeof(T) * job.columns * inner_);
        } else {
          for (int64_t c = 0; c < job.columns; ++c)
            copy_inner(to + c * job.step * out_.long_stride, from + c * job.step * src_.long_stride, src_inner_);
        }
      }
    }
  }

  // copy_jobs for columns of kColumnBytes contiguous bytes. At swap_interval 1 a quarter of a
  // stitch's columns are lone columns alternating between two views: one fixed-size move
  // each here, against a length-dispatched copy_bytes (at 10 minutes of AudioLDM latent that
  // took stitch from 81% to 90% of copy_ bandwidth; see benchmarks/README.md).
  template <size_t kColumnBytes>
  void copy_dense_jobs(const std::vector<CopyJob>& jobs, int64_t from_offset, int64_t to_offset) const {
    const bool dense_run = src_.long_stride == inner_ && out_.long_stride == inner_;
    for (const CopyJob& job : jobs) {
      const T* from = job.from + from_offset;
      T* to = job.to + to_offset;
      if (job.columns == 1) {
        std::memcpy(to, from, kColumnBytes);
      } else if (dense_run && job.step == 1) {
        std::memcpy(to, from, kColumnBytes * job.columns);
      } else {
        // Strides in locals: memcpy may alias any memory, so members would be reloaded per column.
        const int64_t from_step = job.step * src_.long_stride, to_step = job.step * out_.long_stride;
        const int64_t columns = job.columns;
        for (int64_t c = 0; c < columns; ++c) std::memcpy(to + c * to_step, from + c * from_step, kColumnBytes);
      }
    }
  }

  // copy_dense_jobs of a grid's run jobs.
  template <size_t kColumnBytes>
  void copy_dense_jobs(const std::vector<RunJob>& jobs, int64_t from_offset, int64_t to_offset) const {
    // A grid's jobs side by side over the same band of canvas rows (as the plan lists them: a
    // band's runs left to right) run canvas row by canvas row, so the latent is written as one
    // sequential stream: band by band, tile by tile it took 1.4x as long (40 against 28 us for the
    // SD 2048 x 2048 grid's stitch at swap_interval 64, docs/kernels.md section 8).
    for (size_t first = 0; first < jobs.size();) {
      size_t last = first + 1;
      while (last < jobs.size() && jobs[last].rows == jobs[first].rows) ++last;
      for (int64_t i = 0; i < jobs[first].rows; ++i)
        for (size_t j = first; j < last; ++j) copy_dense_row<kColumnBytes>(jobs[j], i, from_offset, to_offset);
      first = last;
    }
  }

  // Row i of a grid's copy job, at the given outer offsets.
  template <size_t kColumnBytes>
  void copy_dense_row(const RunJob& job, int64_t i, int64_t from_offset, int64_t to_offset) const {
    // Strides in locals: memcpy may alias any memory, so members would be reloaded per column.
    const int64_t from_long = src_.long_stride, to_long = out_.long_stride, columns = job.columns;
    const T* from = job.from + from_offset + i * job.from_row;
    T* to = job.to + to_offset + i * job.to_row;
    if (job.from_odd != nullptr) {
      interleave<kColumnBytes>(to, from, job.from_odd + from_offset + i * job.from_row, columns, from_long, to_long);
    } else if (columns == 1) {
      std::memcpy(to, from, kColumnBytes);
    } else if (job.step == 1 && from_long == inner_ && to_long == inner_) {
      std::memcpy(to, from, kColumnBytes * columns);
    } else {
      const int64_t from_step = job.step * from_long, to_step = job.step * to_long;
      for (int64_t c = 0; c < columns; ++c) std::memcpy(to + c * to_step, from + c * from_step, kColumnBytes);
    }
  }

  // One canvas row of an interleave job (RunJob::from_odd) of kColumnBytes columns: `columns`
  // target columns, the even ones from `even`, the odd ones from `odd`, each source read at step 2.
  template <size_t kColumnBytes>
  static void interleave(T* to, const T* even, const T* odd, int64_t columns, int64_t from_long, int64_t to_long) {
    const int64_t from_step = 2 * from_long, pairs = columns / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      std::memcpy(to + 2 * j * to_long, even + j * from_step, kColumnBytes);
      std::memcpy(to + (2 * j + 1) * to_long, odd + j * from_step, kColumnBytes);
    }
    if (columns % 2) std::memcpy(to + 2 * pairs * to_long, even + pairs * from_step, kColumnBytes);
  }

  // memcpy, with the short copies (one column of AudioLDM's 16 floats is 64 bytes, of an
  // image latent 4 bytes) done inline with fixed-size moves: a call per copy would cost
  // more than the copy.
  static void copy_bytes(void* to, const void* from, size_t n) {
    if (n > 256) {
      std::memcpy(to, from, n);
      return;
    }
    char* d = static_cast<char*>(to);
    const char* s = static_cast<const char*>(from);
    for (; n >= 32; n -= 32, d += 32, s += 32) std::memcpy(d, s, 32);
    if (n & 16) std::memcpy(d, s, 16), d += 16, s += 16;
    if (n & 8) std::memcpy(d, s, 8), d += 8, s += 8;
    if (n & 4) std::memcpy(d, s, 4), d += 4, s += 4;
    if (n & 2) std::memcpy(d, s, 2);  // element sizes are 2, 4 or 8: no odd byte
  }

  // One column's inner segment: bitwise, never through arithmetic.
  void copy_inner(T* d, const T* s, int64_t s_inner) const { copy_span(d, s, inner_, out_inner_, s_inner); }

  // n elements, d[e * d_stride] = s[e * s_stride]: bitwise, never through arithmetic.
  static void copy_span(T* d, const T* s, int64_t n, int64_t d_stride, int64_t s_stride) {
    if (s_stride == 1 && d_stride == 1) {
      copy_bytes(d, s, sizeof(T) * n);
    } else {
      for (int64_t e = 0; e < n; ++e) d[e * d_stride] = s[e * s_stride];
    }
  }

  // A span of n elements of a row at outer index o: element e lies at the row's cells (shifted
  // by src_shift, out_shift, ref_shift positions in each operand) + e * stride. Either one cell's
  // inner segment, or, when inner is 1, one canvas row of the run's cells (stride = step
  // long-axis strides).
  struct Span {
    int64_t src_shift, out_shift, ref_shift, n, src_stride, out_stride, ref_stride;
  };

  // The weighted mean of the row's sources over the span, written to every target, tile by tile.
  void weighted_span(const Row<T>& row, int64_t src_offset, int64_t out_offset, const Span& span) const {
    Acc acc[kTile];
    for (int64_t e0 = 0; e0 < span.n; e0 += kTile) {
      const int64_t n = std::min(kTile, span.n - e0);
      std::fill(acc, acc + n, Acc(0));
      for (int64_t k = 0; k < row.num_sources; ++k) {
        const T* s = row.sources[k] + src_offset + e0 * span.src_stride;
        const Acc w = row.weights[k];
        if (span.src_stride == 1) {
          for (int64_t e = 0; e < n; ++e) acc[e] += w * static_cast<Acc>(s[e]);
        } else {
          for (int64_t e = 0; e < n; ++e) acc[e] += w * static_cast<Acc>(s[e * span.src_stride]);
        }
      }
      // All sources of this tile are read before any target is written (in-place sync): a
      // target of element e is a source of element e only, never of another element.
      for (int64_t t = 0; t < row.num_targets; ++t) {
        T* d = row.targets[t] + out_offset + e0 * span.out_stride;
        for (int64_t e = 0; e < n; ++e) d[e * span.out_stride] = static_cast<T>(acc[e]);
      }
    }
  }

  // The row's own value (no reference) over the span, into every target.
  void own_span(const Row<T>& row, int64_t src_offset, int64_t out_offset, const Span& span) const {
    if (row.num_sources == 0) return;  // nothing to write: the cell keeps its value
    if (row.copy) {
      const T* s = row.sources[0] + src_offset;
      for (int64_t t = 0; t < row.num_targets; ++t)
        if (row.targets[t] != row.sources[0])
          copy_span(row.targets[t] + out_offset, s, span.n, span.out_stride, span.src_stride);
    } else {
      weighted_span(row, src_offset, out_offset, span);
    }
  }

  // A row with a reference column, or with several sources, at outer index o: the whole run as
  // one span when inner is 1, else cell by cell.
  void apply_row(const Row<T>& row, int64_t o) const {
    const int64_t step = row.step;
    for (int64_t i = 0; i < row.rows; ++i) {
      const int64_t src_shift = i * row.src_row, out_shift = i * row.out_row, ref_shift = i * row.ref_row;
      if (inner_ == 1 && parity_.axis_part != 2) {
        apply_span(row, o, {src_shift, out_shift, ref_shift, row.count, step * src_.long_stride,
                            step * out_.long_stride, step * ref_long_stride_});
      } else {
        for (int64_t j = 0; j < row.count; ++j)
          apply_span(row, o, {src_shift + j * step, out_shift + j * step, ref_shift + j * step, inner_, src_inner_,
                              out_inner_, ref_inner_});
      }
    }
  }

  void apply_span(const Row<T>& row, int64_t o, const Span& span) const {
    const int64_t src_offset = o * src_.outer_stride + span.src_shift * src_.long_stride;
    const int64_t out_offset = o * out_.outer_stride + span.out_shift * out_.long_stride;
    if (row.ref_col < 0) {
      own_span(row, src_offset, out_offset, span);
      return;
    }
    const T* ref = ref_ + (row.ref_col + span.ref_shift) * ref_long_stride_ + o * ref_outer_stride_;
    if (parity_.axis_part == 0 || (parity_.axis_part == 1 && parity_.takes(o))) {
      for (int64_t t = 0; t < row.num_targets; ++t)
        copy_span(row.targets[t] + out_offset, ref, span.n, span.out_stride, span.ref_stride);
    } else if (parity_.axis_part == 1) {
      own_span(row, src_offset, out_offset, span);
    } else {
      mixed_inner(row, ref, src_offset, out_offset);
    }
  }

  // Reference parity along the inner axis: element by element, reference or own value.
  void mixed_inner(const Row<T>& row, const T* ref, int64_t src_offset, int64_t out_offset) const {
    for (int64_t i = 0; i < inner_; ++i) {
      T value;
      if (parity_.takes(i)) {
        value = ref[i * ref_inner_];
      } else if (row.copy) {
        value = row.sources[0][src_offset + i * src_inner_];
      } else if (row.num_sources > 0) {
        Acc acc = 0;
        for (int64_t k = 0; k < row.num_sources; ++k)
          acc += row.weights[k] * static_cast<Acc>(row.sources[k][src_offset + i * src_inner_]);
        value = static_cast<T>(acc);
      } else {
        continue;
      }
      for (int64_t t = 0; t < row.num_targets; ++t) row.targets[t][out_offset + i * out_inner_] = value;
    }
  }

  Operand<T> out_, src_;
  int64_t outer_, inner_, K_, T_;
  const int32_t* index_;
  const double* weight_;
  Parity parity_;
  const int32_t* runs_;  // (P, kRunColumns) per row, or nullptr: every row one cell
  const T* ref_ = nullptr;
  int64_t ref_outer_stride_ = 0, ref_long_stride_ = 0, ref_inner_stride_ = 0;
  int64_t src_inner_, out_inner_, ref_inner_;
  int64_t block_rows_;
};

// Every index of the plan must address a real cell: checked once, before any write, so a
// bad plan is an error message rather than a wild write.
void check_plan_indices(const at::Tensor& index, int64_t K, int64_t num_sources, int64_t num_targets,
                        int64_t window) {
  const int32_t* entry = index.data_ptr<int32_t>();
  const int64_t P = index.size(0), width = index.size(1);
  // A branch-free pass that vectorises (-1 <= x < limit  <=>  uint32(x) + 1 <= limit): 3x
  // faster than the loop below, which only runs to name the first bad entry.
  constexpr int64_t kRowsPerChunk = 32;
  const int64_t chunk = width * kRowsPerChunk, total = P * width;
  std::vector<uint32_t> limits(chunk);
  for (int64_t j = 0; j < chunk; ++j) {
    const int64_t k = j % width, limit = k == 0 ? window : k <= K ? num_sources : num_targets;
    limits[j] = static_cast<uint32_t>(std::min<int64_t>(limit, int64_t{1} << 31));
  }
  const uint32_t* flat = reinterpret_cast<const uint32_t*>(entry);
  bool invalid = false;
  int64_t i = 0;
  for (; i + chunk <= total; i += chunk) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < chunk; ++j) bad |= static_cast<uint32_t>(flat[i + j] + 1u > limits[j]);
    invalid |= bad != 0;
  }
  for (int64_t j = 0; i + j < total; ++j) invalid |= flat[i + j] + 1u > limits[j];
  if (!invalid) return;
  for (int64_t r = 0; r < P; ++r, entry += width) {
    TORCH_CHECK(entry[0] >= -1 && entry[0] < window, "merge_cpp_: index[", r, ", 0] (reference column) is ",
                entry[0], ", expected -1 or a column in [0, ", window, ")",
                window == 0 ? " (no reference tensor was given)" : "");
    for (int64_t k = 1; k < width; ++k) {
      const int64_t limit = k <= K ? num_sources : num_targets;
      TORCH_CHECK(entry[k] >= -1 && entry[k] < limit, "merge_cpp_: index[", r, ", ", k, "] is ", entry[k],
                  ", expected -1 or a flat ", k <= K ? "source" : "target", " position in [0, ", limit, ")");
    }
  }
}

// A grid plan's runs: every run stays inside the view (and the reference window) it starts in,
// so a kernel may step through it by strides. Returns the number of cells all rows stand for.
int64_t check_plan_runs(const at::Tensor& index, const at::Tensor& runs, int64_t K, int64_t src_long,
                        int64_t out_long, int64_t window) {
  const int32_t* entry = index.data_ptr<int32_t>();
  const int32_t* run = runs.data_ptr<int32_t>();
  const int64_t P = index.size(0), width = index.size(1);
  const PositionDivider by_src(std::max<int64_t>(1, src_long)), by_out(std::max<int64_t>(1, out_long));
  int64_t cells = 0;
  for (int64_t r = 0; r < P; ++r, entry += width, run += kRunColumns) {
    const int64_t count = run[0], step = run[1], rows = run[2];
    TORCH_CHECK(count >= 1 && step >= 1 && rows >= 1 && run[3] >= 0 && run[4] >= 0 && run[5] >= 0,
                "merge_cpp_: runs[", r, "] is (", count, ", ", step, ", ", rows, ", ", run[3], ", ", run[4], ", ",
                run[5], "), expected a count, a step and rows >= 1 and row strides >= 0");
    cells += count * rows;
    const int64_t span = (count - 1) * step;  // the last cell's shift, before the rows'
    if (span == 0 && rows == 1) continue;  // one cell: check_plan_indices has checked it
    const int64_t src_last = span + (rows - 1) * run[3], out_last = span + (rows - 1) * run[4];
    TORCH_CHECK(entry[0] < 0 || entry[0] + span + (rows - 1) * run[5] < window, "merge_cpp_: runs[", r,
                "] takes reference column ", entry[0], " past the reference's window ", window);
    for (int64_t k = 1; k < width; ++k) {
      const bool source = k <= K;
      TORCH_CHECK(entry[k] < 0 || (source ? by_src : by_out).remainder(entry[k]) + (source ? src_last : out_last) <
                                      (source ? src_long : out_long),
                  "merge_cpp_: runs[", r, "] takes index[", r, ", ", k, "] = ", entry[k],
                  " past the end of its view (", source ? src_long : out_long, " cells)");
    }
  }
  return cells;
}

void merge_cpu(const at::Tensor& out, const std::optional<at::Tensor>& src_opt,
               const std::optional<at::Tensor>& reference_opt, const at::Tensor& index, const at::Tensor& weight,
               at::IntArrayRef parity, const std::optional<at::Tensor>& runs_opt) {
  const MergeOperands operands =
      check_merge_args("merge_cpp_", at::kCPU, out, src_opt, reference_opt, index, weight, parity, runs_opt);
  const at::Tensor &src = operands.src, &reference = operands.reference, &runs = operands.runs;
  const int64_t P = index.size(0), K = weight.size(1);
  const Parity par{parity[0], parity[1], parity[2], parity[3]};

  const at::Tensor& source = src.defined() ? src : out;
  const int64_t window = reference.defined() ? reference.size(1) : 0;
  check_plan_indices(index, K, source.size(0) * source.size(2), out.size(0) * out.size(2), window);
  const int64_t cells = runs.defined() ? check_plan_runs(index, runs, K, source.size(2), out.size(2), window) : P;
  mark_written(out);
  const int64_t cells_per_row = out.size(1) * out.size(3) * (P ? std::max<int64_t>(1, cells / P) : 1);
  if (P == 0 || out.size(1) * out.size(3) == 0) return;

  // Aim for chunks of ~64K cells: big enough to amortise a task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / cells_per_row);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "merge_cpp_", [&] {
    const PlanExecutor<scalar_t> executor(out, src, reference, index, weight, par, runs);
    at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) { executor.run(begin, end); });
  });
}

}  // namespace
}  // namespace safa

TORCH_LIBRARY_IMPL(safa, CPU, m) { m.impl("merge_cpp_", &safa::merge_cpu); }

// `import safa_kernels._C` loads this library, which runs the registration above; the
// module itself is empty.
static PyModuleDef safa_kernels_module = {PyModuleDef_HEAD_INIT, "_C",
                                          "safa_kernels compiled kernels (registered with torch.library)", -1,
                                          nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&safa_kernels_module); }
