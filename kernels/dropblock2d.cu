// DropBlock 2D kernels. Entry points are extern "C" with the op and dtype in the
// name, so an Nsight timeline reads plainly.

#include "sampling.cuh"

// One thread per window: the seed words of every plane's seed grid, in window
// order (plane, seed row, segment). Used to check the device sampler against the
// CPU contract.
extern "C" __global__ void dropblock2d_sample_seeds(DropBlockGeometry g, DropBlockSampling s, uint64_t* seeds) {
    const uint64_t windows = g.planes * g.seed_h * g.windows_per_row;
    for (uint64_t w = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; w < windows;
         w += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t segment = (uint32_t)(w % g.windows_per_row);
        const uint32_t len = min(64u, g.seed_w - segment * 64u);
        seeds[w] = dropblock::sample_window(s, w, len);
    }
}
