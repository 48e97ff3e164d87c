// The packing planner in C++: themis_engine._planner.plan(tokens, seq_offsets, group_offsets, budget).
//
// Same contract and same output as themis_engine/packing.py's plan_python (see its docstrings):
//   * layout checks, in the same order and with the same messages;
//   * each group's shared prefix: the longest common token prefix of its K >= 2 sequences, capped so
//     that every suffix keeps >= 1 token (0 for K = 1);
//   * first-fit decreasing on the groups' unique token counts: stable sort by size, largest first,
//     ties by group index; each group into the first micro-batch with room, else a new one. The
//     first fit is a max-tree over the bins' remaining room (leaves of unopened bins hold the whole
//     budget, so the leftmost leaf with room is either an open bin or the next new one): O(G log G);
//   * each micro-batch's arrays, laid out in the order its groups were placed.
//
// Errors are ValueError with packing.py's exact text (the Python wrapper re-raises them as
// PackingError). All work runs with the GIL released; the GIL is taken only to allocate the output
// numpy arrays and to build the returned list of tuples
//   (input_ids, position_ids, cu_seqlens, prefix_start, prefix_len, max_seqlen, score_index,
//    seq_ids, group_ids)
// one per micro-batch, in bin order.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = std::int64_t;
using i32 = std::int32_t;

using InArray = py::array_t<i64, py::array::c_style | py::array::forcecast>;

// The plan of every micro-batch, before any output array exists.
struct Plan {
    std::vector<i64> prefix;      // [G] shared prefix length of each group
    std::vector<i64> size;        // [G] unique tokens of each group in the stream
    std::vector<i64> bin_groups;  // the groups of every bin, bin after bin, in placement order
    std::vector<i64> bin_start;   // [B+1] bin b holds bin_groups[bin_start[b] : bin_start[b+1]]
    std::vector<i64> bin_tokens;  // [B] T of each micro-batch
    std::vector<i64> bin_segs;    // [B] S
    std::vector<i64> bin_seqs;    // [B] N
};

// One micro-batch's output buffers (owned by numpy arrays allocated under the GIL).
struct BatchOut {
    i64* input_ids;
    i64* position_ids;
    i32* cu_seqlens;
    i32* prefix_start;
    i32* prefix_len;
    i64* score_index;
    i64* seq_ids;
    i64* group_ids;
    i64 max_seqlen;
};

// Length of the common prefix of a[0:n] and b[0:n].
inline i64 common_prefix(const i64* a, const i64* b, i64 n) {
    constexpr i64 kBlock = 64;
    i64 j = 0;
    while (j + kBlock <= n && std::memcmp(a + j, b + j, kBlock * sizeof(i64)) == 0) j += kBlock;
    while (j < n && a[j] == b[j]) ++j;
    return j;
}

// Split items 0..n-1 into at most max_parts contiguous runs of about equal weight (weight_before(i):
// the summed weight of items 0..i-1, nondecreasing) and run body(lo, hi) on each, one thread per
// run. Few threads, and only for big inputs: the work is memory-bound.
template <class WeightBefore, class Body>
void parallel_runs(i64 n, WeightBefore weight_before, Body body) {
    const i64 total = n > 0 ? weight_before(n) : 0;
    const unsigned hw = std::thread::hardware_concurrency();
    const i64 parts = std::min<i64>({static_cast<i64>(hw == 0 ? 1 : hw), 8, n, total / (1 << 20) + 1});
    if (parts <= 1) {
        body(i64{0}, n);
        return;
    }
    std::vector<i64> cut(parts + 1, n);
    cut[0] = 0;
    for (i64 k = 1; k < parts; ++k) {  // first item whose run starts at or after k/parts of the weight
        i64 lo = cut[k - 1], hi = n;
        while (lo < hi) {
            const i64 mid = lo + (hi - lo) / 2;
            if (weight_before(mid) * parts >= total * k) hi = mid; else lo = mid + 1;
        }
        cut[k] = lo;
    }
    std::vector<std::thread> pool;
    for (i64 k = 1; k < parts; ++k) {
        try {
            pool.emplace_back(body, cut[k], cut[k + 1]);
        } catch (const std::system_error&) {  // no thread to be had: do that run here
            body(cut[k], cut[k + 1]);
        }
    }
    body(cut[0], cut[1]);
    for (auto& th : pool) th.join();
}

// Layout checks of packing._check_layout, same order, same messages. Returns "" when valid.
std::string check_layout(i64 n_tokens, const i64* so, i64 n_so, const i64* go, i64 n_go) {
    if (n_so < 1 || so[0] != 0 || so[n_so - 1] != n_tokens)
        return "seq_offsets must start at 0 and end at len(tokens)";
    if (n_go < 1 || go[0] != 0 || go[n_go - 1] != n_so - 1)
        return "group_offsets must start at 0 and end at the number of sequences";
    for (i64 i = 0; i + 1 < n_so; ++i)
        if (so[i + 1] - so[i] <= 0)
            return "sequence " + std::to_string(i) + " is empty: every sequence needs at least one token";
    for (i64 g = 0; g + 1 < n_go; ++g)
        if (go[g + 1] - go[g] <= 0) return "group " + std::to_string(g) + " has no sequences";
    return "";
}

// Shared prefixes, sizes, first-fit decreasing and per-bin counts. Returns "" or the error text.
std::string make_plan(const i64* tok, const i64* so, const i64* go, i64 G, i64 budget, Plan& p) {
    p.prefix.assign(G, 0);
    p.size.assign(G, 0);
    auto prefixes = [&](i64 lo, i64 hi) {
        for (i64 g = lo; g < hi; ++g) {
            const i64 a = go[g], b = go[g + 1], K = b - a;
            i64 P = 0;
            if (K >= 2) {
                i64 limit = so[a + 1] - so[a];
                for (i64 i = a + 1; i < b; ++i) limit = std::min(limit, so[i + 1] - so[i]);
                limit -= 1;
                if (limit > 0) {
                    P = limit;
                    const i64* first = tok + so[a];
                    for (i64 i = a + 1; i < b && P > 0; ++i) P = common_prefix(first, tok + so[i], P);
                }
            }
            p.prefix[g] = P;
            p.size[g] = (so[b] - so[a]) - (K - 1) * P;
        }
    };
    parallel_runs(G, [&](i64 g) { return so[go[g]]; }, prefixes);

    // largest first, ties by group index (numpy's stable argsort of -sizes)
    std::vector<i64> order(G);
    std::iota(order.begin(), order.end(), i64{0});
    std::stable_sort(order.begin(), order.end(), [&](i64 x, i64 y) { return p.size[x] > p.size[y]; });

    p.bin_start.assign(1, 0);
    p.bin_groups.clear();
    p.bin_tokens.clear();
    p.bin_segs.clear();
    p.bin_seqs.clear();
    if (G == 0) return "";
    // the largest group is the first one placed: the Python planner fails on it, before any other
    const i64 g0 = order[0];
    if (p.size[g0] > budget)
        return "group " + std::to_string(g0) + " needs " + std::to_string(p.size[g0]) +
               " tokens, over the token budget of " + std::to_string(budget) +
               " per micro-batch; raise max_tokens_per_batch (or lower max_length)";

    // max-tree over the room of bins 0..cap-1 (unopened bins: the whole budget)
    std::size_t cap = 1;
    while (cap < static_cast<std::size_t>(G)) cap <<= 1;
    std::vector<i64> tree(2 * cap, budget);
    std::vector<i64> bin_of(G);
    i64 n_bins = 0;
    for (i64 g : order) {
        const i64 s = p.size[g];
        std::size_t node = 1;
        while (node < cap) node = (tree[2 * node] >= s) ? 2 * node : 2 * node + 1;
        const i64 bin = static_cast<i64>(node - cap);
        if (bin == n_bins) ++n_bins;
        bin_of[g] = bin;
        tree[node] -= s;
        for (node >>= 1; node >= 1; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
    }

    p.bin_start.assign(n_bins + 1, 0);
    p.bin_tokens.assign(n_bins, 0);
    p.bin_segs.assign(n_bins, 0);
    p.bin_seqs.assign(n_bins, 0);
    for (i64 g = 0; g < G; ++g) {
        const i64 b = bin_of[g], K = go[g + 1] - go[g];
        p.bin_start[b + 1] += 1;
        p.bin_tokens[b] += p.size[g];
        p.bin_segs[b] += K + (p.prefix[g] > 0 ? 1 : 0);
        p.bin_seqs[b] += K;
    }
    for (i64 b = 0; b < n_bins; ++b) p.bin_start[b + 1] += p.bin_start[b];
    p.bin_groups.assign(G, 0);
    std::vector<i64> fill(p.bin_start.begin(), p.bin_start.end() - 1);
    for (i64 g : order) p.bin_groups[fill[bin_of[g]]++] = g;  // placement order inside each bin
    return "";
}

// Lay out bin b's groups as one stream with its metadata.
void fill_batch(const i64* tok, const i64* so, const i64* go, const Plan& p, i64 b, BatchOut& o) {
    i64 cursor = 0, seg = 0, row = 0, max_len = 0;
    o.cu_seqlens[0] = 0;
    auto segment = [&](const i64* src, i64 len, i64 first_pos, i64 p_start, i64 p_len) {
        std::memcpy(o.input_ids + cursor, src, static_cast<std::size_t>(len) * sizeof(i64));
        i64* pos = o.position_ids + cursor;
        for (i64 j = 0; j < len; ++j) pos[j] = first_pos + j;
        cursor += len;
        o.prefix_start[seg] = static_cast<i32>(p_start);
        o.prefix_len[seg] = static_cast<i32>(p_len);
        o.cu_seqlens[++seg] = static_cast<i32>(cursor);
        max_len = std::max(max_len, len);
    };
    for (i64 j = p.bin_start[b], n = 0; j < p.bin_start[b + 1]; ++j, ++n) {
        const i64 g = p.bin_groups[j];
        o.group_ids[n] = g;
        const i64 a = go[g], e = go[g + 1], P = p.prefix[g];
        const i64 prefix_at = cursor;
        if (P > 0) segment(tok + so[a], P, 0, 0, 0);
        for (i64 i = a; i < e; ++i) {
            segment(tok + so[i] + P, so[i + 1] - so[i] - P, P, P > 0 ? prefix_at : 0, P);
            o.score_index[row] = cursor - 1;
            o.seq_ids[row] = i;
            ++row;
        }
    }
    o.max_seqlen = max_len;
}

// Fill every bin (bins are independent), on a few threads when the stream is large.
void fill_all(const i64* tok, const i64* so, const i64* go, const Plan& p, std::vector<BatchOut>& outs) {
    std::vector<i64> before(outs.size() + 1, 0);  // tokens of the bins before bin b
    for (std::size_t b = 0; b < outs.size(); ++b) before[b + 1] = before[b] + p.bin_tokens[b];
    parallel_runs(
        static_cast<i64>(outs.size()), [&](i64 b) { return before[b]; },
        [&](i64 lo, i64 hi) {
            for (i64 b = lo; b < hi; ++b) fill_batch(tok, so, go, p, b, outs[b]);
        });
}

py::list plan(const InArray& tokens, const InArray& seq_offsets, const InArray& group_offsets, i64 budget) {
    if (tokens.ndim() != 1 || seq_offsets.ndim() != 1 || group_offsets.ndim() != 1)
        throw py::type_error("tokens, seq_offsets and group_offsets must be 1-D arrays");
    const i64* tok = tokens.data();
    const i64* so = seq_offsets.data();
    const i64* go = group_offsets.data();
    const i64 n_tokens = tokens.shape(0), n_so = seq_offsets.shape(0), n_go = group_offsets.shape(0);

    Plan p;
    std::string err;
    {
        py::gil_scoped_release nogil;
        err = check_layout(n_tokens, so, n_so, go, n_go);
        if (err.empty()) err = make_plan(tok, so, go, n_go - 1, budget, p);
    }
    if (!err.empty()) throw py::value_error(err);

    const i64 B = static_cast<i64>(p.bin_tokens.size());
    std::vector<py::array_t<i64>> ids, pos, score, sids, gids;
    std::vector<py::array_t<i32>> cu, pstart, plen;
    std::vector<BatchOut> outs(B);
    for (auto* v : {&ids, &pos, &score, &sids, &gids}) v->reserve(B);
    for (auto* v : {&cu, &pstart, &plen}) v->reserve(B);
    for (i64 b = 0; b < B; ++b) {
        const i64 T = p.bin_tokens[b], S = p.bin_segs[b], N = p.bin_seqs[b];
        const i64 nG = p.bin_start[b + 1] - p.bin_start[b];
        ids.emplace_back(T);
        pos.emplace_back(T);
        cu.emplace_back(S + 1);
        pstart.emplace_back(S);
        plen.emplace_back(S);
        score.emplace_back(N);
        sids.emplace_back(N);
        gids.emplace_back(nG);
        outs[b] = BatchOut{ids[b].mutable_data(),   pos[b].mutable_data(),   cu[b].mutable_data(),
                           pstart[b].mutable_data(), plen[b].mutable_data(), score[b].mutable_data(),
                           sids[b].mutable_data(),   gids[b].mutable_data(), 0};
    }
    {
        py::gil_scoped_release nogil;
        fill_all(tok, so, go, p, outs);
    }
    py::list result;
    for (i64 b = 0; b < B; ++b)
        result.append(py::make_tuple(std::move(ids[b]), std::move(pos[b]), std::move(cu[b]), std::move(pstart[b]),
                                     std::move(plen[b]), outs[b].max_seqlen, std::move(score[b]),
                                     std::move(sids[b]), std::move(gids[b])));
    return result;
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
    m.doc() = "C++ packing planner of themis_engine (same output as themis_engine.packing.plan_python)";
    m.def("plan", &plan, py::arg("tokens"), py::arg("seq_offsets"), py::arg("group_offsets"), py::arg("budget"),
          "Shared prefixes, first-fit-decreasing placement and the micro-batches, in bin order: a list of "
          "(input_ids, position_ids, cu_seqlens, prefix_start, prefix_len, max_seqlen, score_index, seq_ids, "
          "group_ids) tuples. Raises ValueError with packing.py's messages.");
}
