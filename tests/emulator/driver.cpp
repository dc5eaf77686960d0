// Host driver for the kernel emulation test (tests/kernel_emulation.rs): reads one
// call's parameters and input, runs the kernels in the launch sequence of
// src/cuda/ops.rs under the emulator, and writes what they produced.
//
// Request (little-endian): u32 dtype (0 f32, 1 f16, 2 bf16), u32 path (0 fused,
// 1 count_mask, 2 seed_blocks + count_bits, as LaunchPath in src/cuda/ops.rs),
// u32 apply (the apply kernel, an index into APPLY_OPS below, as ops.rs chose it),
// u32 count_blocks, u32 apply_blocks, u32 in_place, u32 unaligned (tensors one
// element past an aligned start), u32 device_key (the key is read from a device
// generator, which the kernels step; the sampling struct's own key is then
// zeroed), u32 calls (the whole sequence runs this many times on the same state,
// with no reset between: the counters must come back zeroed), u32 channels_last
// (1: the count pass writes the planes' bits to a scratch buffer and
// dropblock_channels_last_bits turns them into the keep bits, the apply kernel
// chosen for flat bits; 2: the one-pass kernel CHANNELS_LAST_OPS[apply] does both,
// as channels_last_op in src/cuda/ops.rs chose it), u32 fill (noise fill: dropblock_fill_noise_<T> instead of
// the apply kernel), u32 shard (a shard's call, below), then
// DropBlockGeometry, DropBlockTiles, DropBlockSampling, DropBlockApply as laid out
// in kernels/dropblock_abi.h, then numel elements of x. Response: the keep bits
// (ceil(numel / 32) words), the counts (2 + n), the scales (n), y, then the
// generator's [seed, offset] after the calls.
//
// A shard's call (the sequence of DropBlockCuda::sample_shard, finish_shard and
// apply): the geometry is the global one and DropBlockApply the shard's; after it
// come DropBlockShard, the shard's own DropBlockGeometry (for the element passes)
// and the counts summed over every shard (1 + global n u64), then x (the shard's
// elements). Response: the keep bits, the shard's own counts (1 + global n), the
// scales (the shard's n), y, and the key unchanged.
#include "cuda_host.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>

#include "dropblock.cu"

namespace {

template <typename T>
void read_pod(const char*& p, T& v) {
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
}

template <typename T>
void write_vec(std::ofstream& out, const std::vector<T>& v) {
    out.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

template <typename T>
using ApplyKernel = void (*)(DropBlockGeometry, DropBlockApply, const T*, T*, const uint32_t*, const float*);
template <typename T>
using ChannelsLastKernel = void (*)(DropBlockGeometry, DropBlockApply, const T*, T*, const uint32_t*, uint32_t*,
                                   const float*);
template <typename T>
using FusedKernel = void (*)(DropBlockGeometry, DropBlockTiles, DropBlockSampling, unsigned long long*,
                             DropBlockApply, const T*, T*, uint32_t*, unsigned long long*, float*);

struct Request {
    uint32_t dtype, path, apply, count_blocks, apply_blocks, in_place, unaligned, device_key, calls, channels_last, fill,
        shard;
    DropBlockGeometry g;
    DropBlockTiles tiles;
    DropBlockSampling s;
    DropBlockApply a;
};

template <typename T>
using FillKernel = void (*)(DropBlockGeometry, DropBlockApply, DropBlockGeometry, DropBlockShard, DropBlockSampling,
                            uint32_t, const T*, T*, const uint32_t*);

// The whole tensor of `g` as one shard (what ops.rs passes to noise fill outside shards).
DropBlockShard whole_shard(const DropBlockGeometry& g) {
    DropBlockShard sh{};
    sh.n = g.n;
    sh.c = g.c;
    sh.extent[0] = g.d;
    sh.extent[1] = g.h;
    sh.extent[2] = g.w;
    return sh;
}

// A shard's call: sample_shard's launches, then finish_shard's with the summed
// counts, then the apply kernel on the shard's own geometry.
template <typename T>
int run_shard(const char* p, const char* end, Request r, const ApplyKernel<T>* apply_ops, FillKernel<T> fill_k,
              const char* out_path) {
    const DropBlockApply& a = r.a;
    DropBlockShard sh;
    DropBlockGeometry local;
    read_pod(p, sh);
    read_pod(p, local);
    std::vector<unsigned long long> summed(1 + r.g.n), counts(1 + r.g.n, 0xdeadbeefull);
    std::memcpy(summed.data(), p, summed.size() * 8);
    p += summed.size() * 8;
    if ((size_t)(end - p) != a.numel * sizeof(T)) {
        std::fprintf(stderr, "x has %zu bytes, expected %llu\n", (size_t)(end - p),
                     (unsigned long long)(a.numel * sizeof(T)));
        return 2;
    }
    std::vector<T> x(a.numel), y(a.numel);
    std::memcpy(x.data(), p, a.numel * sizeof(T));
    std::vector<uint32_t> keep((a.numel + 31) / 32, 0xdeadbeefu);
    std::vector<uint32_t> scratch(r.channels_last ? keep.size() : 0, 0xdeadbeefu);
    std::vector<uint32_t>& bits = r.channels_last ? scratch : keep;
    std::vector<unsigned long long> plane_kept(sh.planes, 0xdeadbeefull);
    std::vector<float> scales(sh.n, -1.0f);
    // The host's memsets (src/cuda/ops.rs), then the launches.
    std::fill(bits.begin(), bits.begin() + (sh.planes * a.plane_len + 31) / 32, 0u);
    std::fill(plane_kept.begin(), plane_kept.end(), 0ull);
    std::fill(counts.begin(), counts.end(), 0ull);
    emu::launch(dropblock_shard_blocks, r.count_blocks, 256, r.g, sh, r.s, bits.data());
    emu::launch(dropblock_shard_count, r.count_blocks, 256, sh, a, bits.data(), plane_kept.data());
    emu::launch(dropblock_shard_counts, r.count_blocks, 256, r.g, sh, (const unsigned long long*)plane_kept.data(),
                counts.data());
    DropBlockGeometry apply_g = local;
    if (r.channels_last) {
        if (local.c % 32) std::fill(keep.begin(), keep.end(), 0u);
        emu::launch(dropblock_channels_last_bits, r.apply_blocks, 256, local, a, (const uint32_t*)scratch.data(),
                    keep.data());
        apply_g.sharing = DROPBLOCK_SHARE_NONE;
    }
    emu::launch(dropblock_shard_scales, 1, 256, sh, a, (const unsigned long long*)summed.data(),
                scales.data());
    if (r.fill) {
        emu::launch(fill_k, r.apply_blocks, 256, local, a, r.g, sh, r.s, r.channels_last, (const T*)x.data(), y.data(),
                    (const uint32_t*)keep.data());
    } else {
        emu::launch(apply_ops[r.apply], r.apply_blocks, 256, apply_g, a, (const T*)x.data(), y.data(),
                    (const uint32_t*)keep.data(), (const float*)scales.data());
    }
    unsigned long long key[2] = {r.s.seed, r.s.offset};
    std::ofstream out(out_path, std::ios::binary);
    write_vec(out, keep);
    write_vec(out, counts);
    write_vec(out, scales);
    write_vec(out, y);
    out.write(reinterpret_cast<const char*>(key), sizeof key);
    return out.good() ? 0 : 3;
}

template <typename T>
int run(const char* p, const char* end, Request r, const ApplyKernel<T>* apply_ops,
        const ChannelsLastKernel<T>* channels_last_ops, FusedKernel<T> fused_k, FillKernel<T> fill_k,
        const char* out_path) {
    if (r.shard) return run_shard<T>(p, end, r, apply_ops, fill_k, out_path);
    const DropBlockApply& a = r.a;
    const DropBlockGeometry& g = r.g;
    if ((size_t)(end - p) != a.numel * sizeof(T)) {
        std::fprintf(stderr, "x has %zu bytes, expected %llu\n", (size_t)(end - p),
                     (unsigned long long)(a.numel * sizeof(T)));
        return 2;
    }
    const size_t off = r.unaligned ? 1 : 0;
    std::vector<T> xbuf(a.numel + off), ybuf(a.numel + off);
    std::memcpy(xbuf.data() + off, p, a.numel * sizeof(T));
    std::vector<uint32_t> keep((a.numel + 31) / 32, 0xdeadbeefu);  // kernels must overwrite
    std::vector<uint32_t> scratch(r.channels_last ? keep.size() : 0, 0xdeadbeefu);
    // Where the count pass writes the planes' bits.
    std::vector<uint32_t>& bits = r.channels_last ? scratch : keep;
    // The apply kernels read channels-last bits as flat ones (src/cuda/ops.rs).
    DropBlockGeometry apply_g = g;
    if (r.channels_last) apply_g.sharing = DROPBLOCK_SHARE_NONE;
    std::vector<unsigned long long> counts(DROPBLOCK_COUNT_SAMPLES + g.n, 0);
    std::vector<float> scales(g.n, -1.0f);
    unsigned long long key[2] = {r.s.seed, r.s.offset};
    unsigned long long* kp = r.device_key ? key : nullptr;
    if (r.device_key) r.s.seed = r.s.offset = 0;
    for (uint32_t call = 0; call < r.calls; ++call) {
        T* xp = xbuf.data() + off;
        T* yp = r.in_place ? xp : ybuf.data() + off;
        if (r.in_place) std::memcpy(xp, p, a.numel * sizeof(T));
        if (r.path == 0) {
            emu::launch(fused_k, r.count_blocks, 256, g, r.tiles, r.s, kp, a, xp, yp, bits.data(), counts.data(),
                        scales.data());
            continue;
        }
        if (r.path == 1) {
            emu::launch(dropblock_count_mask, r.count_blocks, 256, g, r.tiles, r.s, kp, a, bits.data(),
                        counts.data(), scales.data());
        } else {
            std::fill(bits.begin(), bits.begin() + (g.planes * a.plane_len + 31) / 32, 0u);
            emu::launch(dropblock_seed_blocks, r.count_blocks, 256, g, r.s, (const unsigned long long*)kp, a,
                        bits.data());
            emu::launch(dropblock_count_bits, r.count_blocks, 256, g, a, bits.data(), counts.data(), scales.data(),
                        kp);
        }
        if (r.channels_last == 2) {
            emu::launch(channels_last_ops[r.apply], r.apply_blocks, 256, g, a, (const T*)xp, yp,
                        (const uint32_t*)scratch.data(), keep.data(), (const float*)scales.data());
            continue;
        }
        if (r.channels_last) {
            if (g.c % 32) std::fill(keep.begin(), keep.end(), 0u);
            emu::launch(dropblock_channels_last_bits, r.apply_blocks, 256, g, a, (const uint32_t*)scratch.data(),
                        keep.data());
        }
        if (r.fill) {
            emu::launch(fill_k, r.apply_blocks, 256, g, a, g, whole_shard(g), r.s, r.channels_last, (const T*)xp, yp,
                        (const uint32_t*)keep.data());
        } else {
            emu::launch(apply_ops[r.apply], r.apply_blocks, 256, apply_g, a, (const T*)xp, yp,
                        (const uint32_t*)keep.data(), (const float*)scales.data());
        }
    }
    const T* yp = r.in_place ? xbuf.data() + off : ybuf.data() + off;
    std::ofstream out(out_path, std::ios::binary);
    write_vec(out, keep);
    write_vec(out, counts);
    write_vec(out, scales);
    out.write(reinterpret_cast<const char*>(yp), a.numel * sizeof(T));
    out.write(reinterpret_cast<const char*>(key), sizeof key);
    return out.good() ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: driver REQUEST RESPONSE\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<char> req((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const char* p = req.data();
    const char* end = p + req.size();
    Request r;
    for (uint32_t* f : {&r.dtype, &r.path, &r.apply, &r.count_blocks, &r.apply_blocks, &r.in_place, &r.unaligned,
                        &r.device_key, &r.calls, &r.channels_last, &r.fill, &r.shard})
        read_pod(p, *f);
    read_pod(p, r.g);
    read_pod(p, r.tiles);
    read_pod(p, r.s);
    read_pod(p, r.a);
    if (r.apply > (r.channels_last == 2 ? 1u : 4u)) {
        std::fprintf(stderr, "unknown apply kernel %u\n", r.apply);
        return 2;
    }
    // ops, channels_last_ops: the order of APPLY_OPS and CHANNELS_LAST_OPS in src/cuda/ops.rs.
#define DROPBLOCK_RUN(T, NAME)                                                                                   \
    [&] {                                                                                                        \
        const ApplyKernel<T> ops[] = {dropblock_apply_##NAME, dropblock_apply_per_sample_##NAME,             \
                                      dropblock_apply_shared_##NAME, dropblock_apply_shared_per_sample_##NAME, \
                                      dropblock_apply_unaligned_##NAME};                                       \
        const ChannelsLastKernel<T> channels_last_ops[] = {dropblock_apply_channels_last_##NAME,               \
                                                           dropblock_apply_channels_last_per_sample_##NAME};   \
        return run<T>(p, end, r, ops, channels_last_ops,                                                         \
                      r.unaligned ? dropblock_fused_unaligned_##NAME : dropblock_fused_##NAME,                    \
                      dropblock_fill_noise_##NAME, argv[2]);                                                     \
    }()
    switch (r.dtype) {
        case 0: return DROPBLOCK_RUN(float, f32);
        case 1: return DROPBLOCK_RUN(__half, f16);
        default: return DROPBLOCK_RUN(__nv_bfloat16, bf16);
    }
}
