// Host driver for the kernel emulation test (tests/kernel_emulation.rs): reads one
// call's parameters and input, runs the kernels in the launch sequence of
// src/cuda/ops.rs under the emulator, and writes what they produced.
//
// Request (little-endian): u32 dtype (0 f32, 1 f16, 2 bf16), u32 path (0 fused,
// 1 count_mask, 2 seed_blocks + count_bits, as LaunchPath in src/cuda/ops.rs),
// u32 count_blocks, u32 apply_blocks, u32 in_place, u32 unaligned (tensors one
// element past an aligned start, through the _unaligned kernels), u32 device_key
// (the key is read from a device generator, stepped after the call; the
// sampling struct's own key is then zeroed), then DropBlockGeometry,
// DropBlockSampling, DropBlockApply as laid out in kernels/dropblock_abi.h, then
// numel elements of x. Response: the keep bits (n*c planes), the counts (2 + n),
// the scales (n), y, then the generator's [seed, offset] after the call.
#include "cuda_host.h"

#include <cstdio>
#include <fstream>
#include <algorithm>
#include <iterator>

#include "dropblock2d.cu"

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
using FusedKernel = void (*)(DropBlockGeometry, DropBlockSampling, const unsigned long long*, DropBlockApply, const T*,
                             T*, uint32_t*, float*);

template <typename T>
int run(const char* p, const char* end, uint32_t path, uint32_t count_blocks, uint32_t apply_blocks,
        uint32_t in_place, uint32_t unaligned, uint32_t device_key, const DropBlockGeometry& g, DropBlockSampling s,
        const DropBlockApply& a, ApplyKernel<T> apply, FusedKernel<T> fused_k, const char* out_path) {
    if ((size_t)(end - p) != a.numel * sizeof(T)) {
        std::fprintf(stderr, "x has %zu bytes, expected %llu\n", (size_t)(end - p),
                     (unsigned long long)(a.numel * sizeof(T)));
        return 2;
    }
    const size_t off = unaligned ? 1 : 0;
    std::vector<T> xbuf(a.numel + off), ybuf(a.numel + off);
    std::memcpy(xbuf.data() + off, p, a.numel * sizeof(T));
    std::vector<uint32_t> bits((uint64_t)g.n * g.c * a.plane_words, 0xdeadbeefu);  // kernels must overwrite
    std::vector<unsigned long long> counts(DROPBLOCK_COUNT_SAMPLES + g.n, 0);
    std::vector<float> scales(g.n, -1.0f);
    unsigned long long key[2] = {s.seed, s.offset};
    const unsigned long long* kp = device_key ? key : nullptr;
    if (device_key) s.seed = s.offset = 0;
    T* xp = xbuf.data() + off;
    T* yp = in_place ? xp : ybuf.data() + off;
    if (path == 0) {
        emu::launch(fused_k, count_blocks, 256, g, s, kp, a, xp, yp, bits.data(), scales.data());
    } else {
        if (path == 1) {
            emu::launch(dropblock2d_count_mask, count_blocks, 256, g, s, kp, a, bits.data(), counts.data(),
                        scales.data());
        } else {
            std::fill(bits.begin(), bits.begin() + g.planes * a.plane_words, 0u);
            emu::launch(dropblock2d_seed_blocks, count_blocks, 256, g, s, kp, a, bits.data());
            emu::launch(dropblock2d_count_bits, count_blocks, 256, g, a, bits.data(), counts.data(), scales.data());
        }
        emu::launch(apply, apply_blocks, 256, g, a, xp, yp, (const uint32_t*)bits.data(), (const float*)scales.data());
    }
    if (device_key) emu::launch(dropblock2d_advance_key, 1, 32, key);
    std::ofstream out(out_path, std::ios::binary);
    write_vec(out, bits);
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
    uint32_t dtype, path, count_blocks, apply_blocks, in_place, unaligned, device_key;
    DropBlockGeometry g;
    DropBlockSampling s;
    DropBlockApply a;
    read_pod(p, dtype);
    read_pod(p, path);
    read_pod(p, count_blocks);
    read_pod(p, apply_blocks);
    read_pod(p, in_place);
    read_pod(p, unaligned);
    read_pod(p, device_key);
    read_pod(p, g);
    read_pod(p, s);
    read_pod(p, a);
#define DROPBLOCK_RUN(T, NAME)                                                                       \
    run<T>(p, end, path, count_blocks, apply_blocks, in_place, unaligned, device_key, g, s, a,                      \
           unaligned ? dropblock2d_apply_unaligned_##NAME : dropblock2d_apply_##NAME,                    \
           unaligned ? dropblock2d_fused_unaligned_##NAME : dropblock2d_fused_##NAME, argv[2])
    switch (dtype) {
        case 0: return DROPBLOCK_RUN(float, f32);
        case 1: return DROPBLOCK_RUN(__half, f16);
        default: return DROPBLOCK_RUN(__nv_bfloat16, bf16);
    }
}
