from .._validation import check_count, check_flag
from ..nn import FlowSequential, FlowStep, Gaussianize, Split, Squeeze
from .base import MultiScaleFlow, _Level


class Glow(MultiScaleFlow):
    """Glow (Kingma & Dhariwal 2018): L levels of squeeze → K flow steps → split.

    Args:
        in_channels: C of the images.
        image_size: H = W of the images, divisible by 2**levels.
        levels: L, the number of scales.
        steps: K, flow steps per level.
        hidden_channels: width of each coupling's conditioner.
        coupling: ``"affine"`` or ``"additive"``.
        lu: LU-parametrised 1×1 convolutions.
        learn_prior: learned conditional priors at the splits and a learned prior at the top;
            otherwise N(0, I).
        memory_saving: train by inversion (:meth:`set_memory_saving`): activation memory of one flow step
            per level instead of K.

    Shapes: x (N, C, H, W) → zs, a list of L latents, the l-th of spatial size H/2^l × W/2^l
    (:meth:`latent_shapes` gives each), and logdet (N,).
    """

    def __init__(self, in_channels=3, image_size=32, levels=3, steps=32, hidden_channels=512,
                 coupling="affine", lu=True, learn_prior=True, memory_saving=False):
        for value, name in ((in_channels, "in_channels"), (image_size, "image_size"), (levels, "levels"),
                            (steps, "steps"), (hidden_channels, "hidden_channels")):
            check_count(value, name)
        for value, name in ((lu, "lu"), (learn_prior, "learn_prior"), (memory_saving, "memory_saving")):
            check_flag(value, name)
        if image_size % 2 ** levels:
            raise ValueError(f"image_size must be divisible by 2**levels = {2 ** levels}, got {image_size}")
        channels, size = in_channels, image_size
        blocks, shapes = [], []
        for level in range(levels):
            channels, size = channels * 4, size // 2
            flow = FlowSequential(Squeeze(), *[FlowStep(channels, hidden_channels, coupling, lu)
                                               for _ in range(steps)])
            if level < levels - 1:
                split = Split(channels, learn_prior)
                shapes.append((channels - split.kept, size, size))
                blocks.append(_Level(flow, split))
                channels = split.kept
            else:
                blocks.append(_Level(flow, Gaussianize(channels) if learn_prior else None))
                shapes.append((channels, size, size))
        super().__init__(in_channels, image_size, blocks, shapes)
        self.set_memory_saving(memory_saving)
