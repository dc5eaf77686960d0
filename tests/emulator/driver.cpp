// Host driver for the kernel emulation test (tests/kernel_emulation.rs): runs a
// recorded sequence of steps (src/cuda/launch.rs writes them to a Queue) on the
// kernels of kernels/dropblock.cu compiled for the host.
//
// It holds no launch logic of its own: which kernels run, in what order, on what
// grid, with which memsets and arguments, all come from the request. It checks each
// argument against its kernel's C++ signature (kind, struct size, pointee type), so
// an argument list in src/cuda/launch.rs that does not match its kernel fails here
// as it would fault, or silently misbehave, on a GPU.
//
// Request (little-endian):
//   u32 buffers, then per buffer: u32 id, u32 element (ELEM below), u64 elements,
//     u32 offset (elements before the pointer: a buffer that is not 16-byte
//     aligned), u32 alias (the id of an earlier buffer this one is, or ~0: y in
//     place is x), u32 zeroed (else filled with 0xde bytes, which kernels must
//     overwrite);
//   u32 steps, then per step a u32 kind:
//     0 zero:   u32 buffer, u64 bytes (at most the buffer's);
//     1 launch: u32 name length, the name, u32 grid, u32 arguments, then per
//               argument a u32 tag (TAG below) and its value: a struct's u32 size
//               and bytes, a u32, a pointer's u32 buffer, or nothing for null;
//     2 upload: u32 buffer, u64 bytes, the bytes;
//     3 save:   u32 buffer (its bytes are appended to the response).
// Response: the saved buffers' bytes, in order.
//
// `driver --list` prints the kernels it can run, one per line.
#include "cuda_host.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>

#include "dropblock.cu"

namespace {

[[noreturn]] void fail(const std::string& why) {
    std::fprintf(stderr, "%s\n", why.c_str());
    std::exit(2);
}

// The kernel running, for a fault's report: a null pointer where a kernel needs a
// buffer (the request may pass null for any pointer), or an access far out of
// bounds, would otherwise end the driver with nothing on stderr.
char running[128] = "no kernel";

// (stdio is not async-signal-safe, but the process ends here either way.)
extern "C" void on_fault(int) {
    std::fprintf(stderr, "a kernel faulted (a null pointer or an access out of bounds?): %s\n", running);
    std::_Exit(4);
}

struct Reader {
    const char* p;
    const char* end;

    const char* bytes(size_t n) {
        if ((size_t)(end - p) < n) fail("the request ends early");
        const char* at = p;
        p += n;
        return at;
    }
    template <typename T>
    T pod() {
        T v;
        std::memcpy(&v, bytes(sizeof(T)), sizeof(T));
        return v;
    }
};

// Element types of buffers (src/cuda/launch.rs's Buffer: u32 bits, u64 counters,
// f32 scales, and the tensors' dtypes).
enum Elem : uint32_t { ELEM_U32, ELEM_U64, ELEM_F32, ELEM_F16, ELEM_BF16, ELEM_COUNT };
constexpr size_t ELEM_BYTES[ELEM_COUNT] = {4, 8, 4, 2, 2};
const char* const ELEM_NAMES[ELEM_COUNT] = {"u32", "u64", "f32", "f16", "bf16"};

template <typename T>
constexpr uint32_t elem_of() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, uint32_t>) return ELEM_U32;
    // unsigned long long, and uint64_t where that is unsigned long.
    else if constexpr (std::is_integral_v<U> && std::is_unsigned_v<U> && sizeof(U) == 8) return ELEM_U64;
    else if constexpr (std::is_same_v<U, float>) return ELEM_F32;
    else if constexpr (std::is_same_v<U, __half>) return ELEM_F16;
    else if constexpr (std::is_same_v<U, __nv_bfloat16>) return ELEM_BF16;
    else static_assert(sizeof(U) == 0, "a kernel parameter points to a type the driver does not know");
}

// Argument kinds (src/cuda/launch.rs's Arg, in its order).
enum Tag : uint32_t { TAG_GEOMETRY, TAG_TILES, TAG_SAMPLING, TAG_APPLY, TAG_SHARD, TAG_U32, TAG_PTR, TAG_NULL, TAG_COUNT };
const char* const TAG_NAMES[TAG_COUNT] = {"DropBlockGeometry", "DropBlockTiles", "DropBlockSampling", "DropBlockApply",
                                          "DropBlockShard",    "u32",            "pointer",           "null"};

std::string tag_name(uint32_t tag) { return tag < TAG_COUNT ? TAG_NAMES[tag] : "tag " + std::to_string(tag); }

template <typename T>
constexpr uint32_t tag_of() {
    if constexpr (std::is_same_v<T, DropBlockGeometry>) return TAG_GEOMETRY;
    else if constexpr (std::is_same_v<T, DropBlockTiles>) return TAG_TILES;
    else if constexpr (std::is_same_v<T, DropBlockSampling>) return TAG_SAMPLING;
    else if constexpr (std::is_same_v<T, DropBlockApply>) return TAG_APPLY;
    else if constexpr (std::is_same_v<T, DropBlockShard>) return TAG_SHARD;
    else if constexpr (std::is_same_v<T, uint32_t>) return TAG_U32;
    else static_assert(sizeof(T) == 0, "a kernel parameter of a type the driver does not know");
}

struct Buffer {
    uint32_t elem;
    uint64_t elements;
    uint32_t offset;
    std::vector<char> data;
};

struct Buffers {
    std::vector<Buffer> own;
    std::map<uint32_t, size_t> index;  // id -> own[index], aliases included

    Buffer& get(uint32_t id) {
        auto it = index.find(id);
        if (it == index.end()) fail("the sequence uses buffer " + std::to_string(id) + ", which the call has not");
        return own[it->second];
    }
    char* ptr(uint32_t id) {
        Buffer& b = get(id);
        return b.data.data() + b.offset * ELEM_BYTES[b.elem];
    }
    uint64_t bytes(uint32_t id) {
        Buffer& b = get(id);
        return b.elements * ELEM_BYTES[b.elem];
    }
};

// Parameter `i` of kernel `k`, read from the request and checked against its type.
template <typename P>
P read_arg(Reader& r, Buffers& bufs, const std::string& k, int i) {
    const uint32_t tag = r.pod<uint32_t>();
    auto where = [&] { return k + " parameter " + std::to_string(i) + ": "; };
    if constexpr (std::is_pointer_v<P>) {
        if (tag == TAG_NULL) return nullptr;
        if (tag != TAG_PTR) fail(where() + "a pointer, given a " + tag_name(tag));
        const uint32_t id = r.pod<uint32_t>();
        constexpr uint32_t want = elem_of<std::remove_pointer_t<P>>();
        if (bufs.get(id).elem != want)
            fail(where() + "points to " + ELEM_NAMES[want] + ", given buffer " + std::to_string(id) + " of " +
                 ELEM_NAMES[bufs.get(id).elem]);
        return reinterpret_cast<P>(bufs.ptr(id));
    } else {
        if (tag != tag_of<P>()) fail(where() + "a " + tag_name(tag_of<P>()) + ", given a " + tag_name(tag));
        if constexpr (std::is_same_v<P, uint32_t>) {
            return r.pod<uint32_t>();
        } else {
            const uint32_t size = r.pod<uint32_t>();
            if (size != sizeof(P))
                fail(where() + std::to_string(size) + " bytes for a struct of " + std::to_string(sizeof(P)));
            return r.pod<P>();
        }
    }
}

using Invoker = std::function<void(Reader&, Buffers&, const std::string&, unsigned)>;

template <typename... P>
Invoker invoker(void (*kernel)(P...)) {
    return [kernel](Reader& r, Buffers& bufs, const std::string& name, unsigned grid) {
        const uint32_t n = r.pod<uint32_t>();
        if (n != sizeof...(P))
            fail(name + ": " + std::to_string(n) + " arguments for " + std::to_string(sizeof...(P)) + " parameters");
        int i = 0;
        // A braced list evaluates its elements in order: the arguments are read in order.
        std::tuple<P...> args{read_arg<P>(r, bufs, name, i++)...};
        std::apply([&](auto... a) { emu::launch(kernel, grid, DROPBLOCK_THREADS, a...); }, args);
    };
}

const std::map<std::string, Invoker>& kernels() {
#define DROPBLOCK_UNTYPED(OP) {"dropblock_" #OP, invoker(dropblock_##OP)}
#define DROPBLOCK_TYPED(OP)                                                                        \
    {"dropblock_" #OP "_f32", invoker(dropblock_##OP##_f32)},                                      \
        {"dropblock_" #OP "_f16", invoker(dropblock_##OP##_f16)}, {                               \
        "dropblock_" #OP "_bf16", invoker(dropblock_##OP##_bf16)                                   \
    }
    static const std::map<std::string, Invoker> table = {
        DROPBLOCK_UNTYPED(count_mask),
        DROPBLOCK_UNTYPED(seed_blocks),
        DROPBLOCK_UNTYPED(count_bits),
        DROPBLOCK_UNTYPED(channels_last_bits),
        DROPBLOCK_UNTYPED(sample_seeds),
        DROPBLOCK_UNTYPED(shard_blocks),
        DROPBLOCK_UNTYPED(shard_count_planes),
        DROPBLOCK_UNTYPED(shard_count_samples),
        DROPBLOCK_UNTYPED(shard_scales),
        DROPBLOCK_TYPED(apply),
        DROPBLOCK_TYPED(apply_per_sample),
        DROPBLOCK_TYPED(apply_shared),
        DROPBLOCK_TYPED(apply_shared_per_sample),
        DROPBLOCK_TYPED(apply_unaligned),
        DROPBLOCK_TYPED(fused),
        DROPBLOCK_TYPED(fused_unaligned),
        DROPBLOCK_TYPED(fill_noise),
        DROPBLOCK_TYPED(apply_channels_last),
        DROPBLOCK_TYPED(apply_channels_last_per_sample),
    };
#undef DROPBLOCK_UNTYPED
#undef DROPBLOCK_TYPED
    return table;
}

void declare_buffers(Reader& r, Buffers& bufs) {
    const uint32_t count = r.pod<uint32_t>();
    for (uint32_t i = 0; i < count; ++i) {
        const auto id = r.pod<uint32_t>(), elem = r.pod<uint32_t>();
        const auto elements = r.pod<uint64_t>();
        const auto offset = r.pod<uint32_t>(), alias = r.pod<uint32_t>(), zeroed = r.pod<uint32_t>();
        if (bufs.index.count(id)) fail("buffer " + std::to_string(id) + " declared twice");
        if (alias != ~0u) {
            bufs.get(alias);
            bufs.index[id] = bufs.index[alias];
            continue;
        }
        if (elem >= ELEM_COUNT) fail("buffer " + std::to_string(id) + ": unknown element type");
        Buffer b{elem, elements, offset, {}};
        b.data.assign((offset + elements) * ELEM_BYTES[elem], zeroed ? 0 : (char)0xde);
        bufs.index[id] = bufs.own.size();
        bufs.own.push_back(std::move(b));
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--list") {
        for (const auto& entry : kernels()) std::printf("%s\n", entry.first.c_str());
        return 0;
    }
    if (argc != 3) fail("usage: driver REQUEST RESPONSE, or driver --list");
#ifndef __SANITIZE_ADDRESS__  // AddressSanitizer reports faults better
    std::signal(SIGSEGV, on_fault);
#ifdef SIGBUS
    std::signal(SIGBUS, on_fault);
#endif
#endif
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<char> req((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    Reader r{req.data(), req.data() + req.size()};
    Buffers bufs;
    declare_buffers(r, bufs);
    std::ofstream out(argv[2], std::ios::binary);
    const uint32_t steps = r.pod<uint32_t>();
    for (uint32_t step = 0; step < steps; ++step) {
        switch (r.pod<uint32_t>()) {
            case 0: {
                const auto id = r.pod<uint32_t>();
                const auto bytes = r.pod<uint64_t>();
                if (bytes > bufs.bytes(id))
                    fail("step " + std::to_string(step) + " zeroes " + std::to_string(bytes) + " bytes of buffer " +
                         std::to_string(id) + ", which holds " + std::to_string(bufs.bytes(id)));
                std::memset(bufs.ptr(id), 0, bytes);
                break;
            }
            case 1: {
                const uint32_t len = r.pod<uint32_t>();
                const std::string name(r.bytes(len), len);
                const auto it = kernels().find(name);
                if (it == kernels().end()) fail("no kernel " + name);
                const uint32_t grid = r.pod<uint32_t>();
                if (grid == 0) fail(name + ": a grid of no blocks");
                std::snprintf(running, sizeof running, "%s", name.c_str());
                it->second(r, bufs, name, grid);
                break;
            }
            case 2: {
                const auto id = r.pod<uint32_t>();
                const auto bytes = r.pod<uint64_t>();
                if (bytes > bufs.bytes(id)) fail("an upload past the end of buffer " + std::to_string(id));
                std::memcpy(bufs.ptr(id), r.bytes(bytes), bytes);
                break;
            }
            case 3: {
                const auto id = r.pod<uint32_t>();
                out.write(bufs.ptr(id), (std::streamsize)bufs.bytes(id));
                break;
            }
            default: fail("unknown step kind");
        }
    }
    if (r.p != r.end) fail("bytes left over after the last step");
    return out.good() ? 0 : 3;
}
