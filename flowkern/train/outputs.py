"""What a run reports besides its log: test-set bits/dim, and samples (PNG grids, or a density plot)."""
import math
import os

import numpy as np
import torch


@torch.no_grad()
def evaluate(model, data, device, batch_size=500) -> float:
    """Mean bits/dim of the test set of ``data`` (dequantisation noise from a fixed seed)."""
    model.eval()
    generator = torch.Generator().manual_seed(12345)
    total = 0.0
    for rows in data.test.split(batch_size):
        x = data.prepare(rows, generator).to(device)
        total += model.bits_per_dim(x, data.n_bins).double().sum().item()
    model.train()
    return total / len(data.test)


@torch.no_grad()
def write_samples(model, data, cfg, device, n=64, tag="") -> list:
    """PNG grids of samples at each of ``cfg.temperatures`` (images) or a density and sample plot (points)
    in ``cfg.out``, named with ``tag`` after the temperature; returns the file names."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if data.images:
        files = []
        for t in cfg.temperatures:
            x = model.sample(n, temperature=t, generator=generator).float().cpu()
            levels = torch.floor((x + 0.5) * data.n_bins).clamp(0, data.n_bins - 1)
            files.append(f"samples_t{t:g}{tag}.png")
            save_grid(levels, data.n_bins, os.path.join(cfg.out, files[-1]))
    else:
        files = [f"density{tag}.png"]
        plot_density(model, data, os.path.join(cfg.out, files[0]), generator)
    model.train()
    return files


def save_grid(levels, n_bins, path, columns=8, pad=1):
    """Write images of integer levels (N, C, H, W) in 0..n_bins−1 as one PNG grid."""
    from PIL import Image

    n, c, h, w = levels.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    pixels = (levels.float() * (255 / (n_bins - 1))).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = pixels[i]
    scale = max(1, 256 // (rows * (h + pad)))  # small images (digits) enlarged for viewing
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def plot_density(model, data, path, generator, grid=200):
    """The model's density over the data's range, beside samples (T = 1) drawn over the test points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    low, high = data.test.min(0).values - 0.5, data.test.max(0).values + 0.5
    xs, ys = (torch.linspace(low[i].item(), high[i].item(), grid) for i in range(2))
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    density = torch.cat([model.log_prob(p.to(device)).exp().cpu() for p in points.split(4096)])
    samples = model.sample(2000, generator=generator).cpu()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    left.imshow(density.reshape(grid, grid).numpy(), origin="lower", cmap="viridis",
                extent=(xs[0].item(), xs[-1].item(), ys[0].item(), ys[-1].item()))
    left.set_title("model density")
    right.scatter(*data.test[:2000].T.numpy(), s=2, c="0.7", label="data")
    right.scatter(*samples.T.numpy(), s=2, c="tab:blue", label="samples")
    right.set_xlim(xs[0].item(), xs[-1].item())
    right.set_ylim(ys[0].item(), ys[-1].item())
    right.legend(loc="upper right")
    right.set_title("samples over the data")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
