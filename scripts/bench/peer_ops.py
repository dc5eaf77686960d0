"""The peers' DropBlock functions, called with dropblock's default semantics where
they allow it, for the benchmark scripts beside this file."""
import inspect


def torchvision_op():
    """torchvision.ops.drop_block2d(x, p, k): valid seed region, a mask per channel."""
    from torchvision.ops import drop_block2d
    return lambda t, p, k: drop_block2d(t, p, k, training=True)


def torchvision_compiled_op():
    """torchvision's drop_block2d under torch.compile (Inductor fuses it into Triton
    kernels): the strongest peer a PyTorch user has. Its ops are all tensor ops, so
    it compiles whole; each new shape or dtype compiles once (dynamic=False), so the
    caller warms it up before timing."""
    import torch
    from torchvision.ops import drop_block2d
    return torch.compile(lambda t, p, k: drop_block2d(t, p, k, training=True), dynamic=False)


def timm_op():
    """timm's drop_block_2d with a mask per channel, as the paper and dropblock's
    default: timm >= 1.0.23 shares one mask across channels unless told not to."""
    from timm.layers import drop_block_2d
    if "couple_channels" in inspect.signature(drop_block_2d).parameters:
        return lambda t, p, k: drop_block_2d(t, drop_prob=p, block_size=k, couple_channels=False)
    return lambda t, p, k: drop_block_2d(t, drop_prob=p, block_size=k)


def torchvision_3d_op():
    """torchvision.ops.drop_block3d(x, p, k): valid seed region, a mask per channel."""
    from torchvision.ops import drop_block3d
    return lambda t, p, k: drop_block3d(t, p, k, training=True)


def miguelvr_3d_op():
    """miguelvr/dropblock 0.3.0's DropBlock3D.forward in training mode, copied line
    for line (MIT licence, Copyright (c) 2018 Miguel Varela Ramos): the GPU
    machines have no network to install the package. Its semantics, not ours: a
    mask per sample drawn with the CPU generator and copied to the device (as the
    original does), γ = p / k³, global normalisation over the mask."""
    import torch
    import torch.nn.functional as F

    def forward(x, drop_prob, block_size):
        gamma = drop_prob / (block_size ** 3)
        mask = (torch.rand(x.shape[0], *x.shape[2:]) < gamma).float()
        mask = mask.to(x.device)
        block_mask = F.max_pool3d(input=mask[:, None, :, :, :],
                                  kernel_size=(block_size, block_size, block_size),
                                  stride=(1, 1, 1),
                                  padding=block_size // 2)
        if block_size % 2 == 0:
            block_mask = block_mask[:, :, :-1, :-1, :-1]
        block_mask = 1 - block_mask.squeeze(1)
        out = x * block_mask[:, None, :, :, :]
        out = out * block_mask.numel() / block_mask.sum()
        return out

    return forward


def versions():
    import timm
    import torch
    import torchvision
    return f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__} (mask per channel)"
