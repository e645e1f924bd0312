from .._validation import check_count, check_flag, check_module_input, check_tensor
from ..nn import AffineCoupling, FlowSequential, MLPConditioner, ResNetConditioner, Split, Squeeze
from .base import FlowModel, MultiScaleFlow, _Level


def _checkerboard_couplings(channels, parities, hidden, blocks, bound):
    return [AffineCoupling(channels, mask="checkerboard", parity=p, scale="exp", bound=bound,
                           conditioner=lambda i, o: ResNetConditioner(i, o, hidden, blocks))
            for p in parities]


class RealNVP(MultiScaleFlow):
    """RealNVP for images (Dinh et al. 2017).

    Each scale but the last: three checkerboard couplings, squeeze, three channel-wise couplings, then
    half the channels factored out under N(0, I). The last scale: four checkerboard couplings. Every
    coupling has scale ``exp(bound · tanh(raw))`` and a residual s/t network.

    Args:
        in_channels: C of the images.
        image_size: H = W, divisible by 2**(scales - 1).
        scales: number of scales.
        hidden_channels, blocks: width and residual blocks of each s/t network.
        bound: bound on each coupling's ``|log s|``.
        memory_saving: train by inversion (:meth:`set_memory_saving`).

    Shapes: x (N, C, H, W) → zs, one latent per scale (see :meth:`latent_shapes`), logdet (N,).
    """

    def __init__(self, in_channels=3, image_size=32, scales=3, hidden_channels=64, blocks=4, bound=2.0,
                 memory_saving=False):
        for value, name in ((in_channels, "in_channels"), (image_size, "image_size"), (scales, "scales"),
                            (hidden_channels, "hidden_channels")):
            check_count(value, name)
        check_count(blocks, "blocks", minimum=0)
        check_flag(memory_saving, "memory_saving")
        if image_size % 2 ** (scales - 1):
            raise ValueError(f"image_size must be divisible by 2**(scales - 1) = {2 ** (scales - 1)}, "
                             f"got {image_size}")
        channels, size = in_channels, image_size
        levels, shapes = [], []
        for _ in range(scales - 1):
            squeezed = channels * 4
            channel_couplings = [
                AffineCoupling(squeezed, mask="channel", parity=p, scale="exp", bound=bound,
                               conditioner=lambda i, o: ResNetConditioner(i, o, hidden_channels, blocks))
                for p in (0, 1, 0)]
            flow = FlowSequential(*_checkerboard_couplings(channels, (0, 1, 0), hidden_channels, blocks, bound),
                                  Squeeze(), *channel_couplings)
            split = Split(squeezed, learn_prior=False)
            size = size // 2
            shapes.append((squeezed - split.kept, size, size))
            levels.append(_Level(flow, split))
            channels = split.kept
        last = FlowSequential(*_checkerboard_couplings(channels, (0, 1, 0, 1), hidden_channels, blocks, bound))
        levels.append(_Level(last))
        shapes.append((channels, size, size))
        super().__init__(in_channels, image_size, levels, shapes)
        self.set_memory_saving(memory_saving)


class RealNVP2d(FlowModel):
    """RealNVP for vectors: MLP couplings with alternating halves and ``log s = bound · tanh(raw)``.

    Args:
        dim: D, the data's dimension (2 for the toy sets).
        hidden: width of each coupling's MLP.
        layers: number of couplings.
        depth: hidden layers per MLP.
        bound: bound on each coupling's ``|log s|``.
        memory_saving: train by inversion (:meth:`set_memory_saving`).

    Shapes: x (N, D) → z (N, D), logdet (N,).
    """

    multi_scale = False

    def __init__(self, dim=2, hidden=64, layers=8, depth=2, bound=2.0, memory_saving=False):
        super().__init__()
        check_count(dim, "dim", minimum=2)
        for value, name in ((hidden, "hidden"), (layers, "layers"), (depth, "depth")):
            check_count(value, name)
        check_flag(memory_saving, "memory_saving")
        self.dim = dim
        self.flow = FlowSequential(*[
            AffineCoupling(dim, mask="channel", parity=i % 2, scale="exp", bound=bound,
                           conditioner=lambda i, o: MLPConditioner(i, o, hidden, depth))
            for i in range(layers)])
        self.set_memory_saving(memory_saving)

    def latent_shapes(self):
        return [(self.dim,)]

    def chains(self):
        return [self.flow]

    def _check(self, x, name):
        check_tensor(x, name, ndim=2)
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (N, {self.dim}), got {tuple(x.shape)}")
        check_module_input(self, x, name)

    def forward(self, x):
        self._check(x, "x")
        z, logdet = self.flow(x[:, :, None, None])
        return z.flatten(1), logdet

    def inverse(self, z):
        self._check(z, "z")
        return self.flow.inverse(z[:, :, None, None]).flatten(1)
