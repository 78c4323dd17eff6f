"""An independent LRP for VGG-like networks, written from the rules' formulas: the oracle of the cross-validation tests.

Nothing here uses Zennit, module hooks or autograd. The network is walked layer by layer (``model.features``, then
``model.avgpool``, the flattening, ``model.classifier``) with :mod:`torch.nn.functional` in float64, every layer's
input is stored, and the relevance is propagated down with each layer's rule written out:

* affine layers (convolutions, linear layers), with ``z = Wx + b`` and the upper relevance ``R``:

  - LRP-ε / LRP-0:  ``R_i = x_i · Σ_j w_ji · R_j / stab(z_j)``
  - LRP-γ (Zennit's generalised form, Andéol et al. 2021): for outputs with ``z_j > 0`` the positive contributions
    ``z⁺_j = (W + γW⁺) x⁺ + (W + γW⁻) x⁻ + b + γb⁺`` share ``R_j``; for ``z_j < 0`` the negative contributions
    ``z⁻_j = (W + γW⁻) x⁺ + (W + γW⁺) x⁻ + b + γb⁻`` do; outputs with ``z_j = 0`` pass nothing on.
  - z^B (first convolution, inputs bounded by ``l ≤ x ≤ h``):
    ``R_i = x_i c_i - l_i c⁺_i - h_i c⁻_i`` with ``c = Wᵀ s``, ``c^± = (W^±)ᵀ s``, ``s = R / stab(Wx + b - (W⁺l + b⁺)
    - (W⁻h + b⁻))``.

* ReLU: Pass (``R_in = R``); average pools: Norm (``R_i = x_i Σ_j p_ji R_j / stab(z_j)`` with the pooling weights
  ``p``); max-pools: winner takes all; dropout (evaluation mode), identity and flattening: identity.

Zennit's conventions, shared here: ``stab(z) = z + sign(z)·s`` with ``sign(0) = +1``; ``s = ε`` on ε layers (``1e-6``
when ``ε = 0``), optionally times the population standard deviation of ``z`` per sample; ``s = 1e-6`` for LRP-0, γ,
z^B and Norm. The conv blocks are found from the max-pools of ``model.features``. With ``zero_bias`` every rule drops
the biases from its denominators, but LRP-γ still picks ``z⁺`` or ``z⁻`` by the sign of the real output (as Zennit).

The end of the module builds the networks the tests check it on (:func:`random_vgg`, :func:`fold_batch_norms`).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input
from torch.nn.modules.utils import _pair
from torchvision.models.vgg import VGG, make_layers

#: The stabiliser of LRP-0, LRP-γ, z^B and Norm, and of LRP-ε with ε = 0.
STABILIZER = 1e-6


def stabilize(denominator, shift):
    """Return ``denominator + sign(denominator)·shift`` with ``sign(0) = +1``; ``shift`` may be a per-sample tensor."""
    shift = torch.as_tensor(shift, dtype=denominator.dtype)
    return denominator + torch.where(denominator >= 0, shift, -shift)


def population_std(values):
    """Standard deviation of every sample over all its non-batch entries (divided by the count, not count - 1)."""
    flat = values.flatten(1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return (centred ** 2).mean(dim=1).sqrt().reshape(-1, *([1] * (values.ndim - 1)))


class Affine:
    """A convolution or linear layer in float64: ``forward(x, W, b) = Wx + b`` and its transpose ``Wᵀ s``."""
    def __init__(self, module):
        self.module = module
        self.weight = module.weight.detach().double()
        self.bias = module.bias.detach().double() if module.bias is not None else torch.zeros(
            module.weight.shape[0], dtype=torch.float64
        )

    def forward(self, input, weight, bias):
        if isinstance(self.module, nn.Linear):
            return input @ weight.T + bias
        module = self.module
        return F.conv2d(input, weight, bias, module.stride, module.padding, module.dilation, module.groups)

    def transpose(self, upper, weight, input_shape):
        """``Wᵀ upper``: how each input is connected to the upper values, summed over the outputs."""
        if isinstance(self.module, nn.Linear):
            return upper @ weight
        module = self.module
        return conv2d_input(input_shape, weight, upper, module.stride, module.padding, module.dilation, module.groups)


def epsilon_rule(layer, input, relevance, shift, std_scaled, zero_bias):
    """LRP-ε: ``R_i = x_i Σ_j w_ji R_j / (z_j + sign(z_j)·s)``, ``s = shift`` (times ``std(z)`` if ``std_scaled``)."""
    bias = torch.zeros_like(layer.bias) if zero_bias else layer.bias
    output = layer.forward(input, layer.weight, bias)
    if std_scaled:
        shift = shift * population_std(output)
    scaled = relevance / stabilize(output, shift)
    return input * layer.transpose(scaled, layer.weight, input.shape)


def gamma_rule(layer, input, relevance, gamma, zero_bias):
    """Generalised LRP-γ; which outputs count as positive is decided by the real output ``Wx + b`` (as in Zennit)."""
    weight, bias = layer.weight, layer.bias
    input_positive, input_negative = input.clamp(min=0), input.clamp(max=0)
    # W + γW⁺ and W + γW⁻ (and the same for the bias)
    favour_positive = weight + gamma * weight.clamp(min=0), bias + gamma * bias.clamp(min=0)
    favour_negative = weight + gamma * weight.clamp(max=0), bias + gamma * bias.clamp(max=0)
    if zero_bias:
        favour_positive = favour_positive[0], torch.zeros_like(bias)
        favour_negative = favour_negative[0], torch.zeros_like(bias)
    no_bias = torch.zeros_like(bias)
    output = layer.forward(input, weight, bias)
    # outputs z_j > 0: share R_j by the positive contributions, (W + γW⁺) x⁺ + (W + γW⁻) x⁻ + b + γb⁺
    positive_total = (
        layer.forward(input_positive, *favour_positive) + layer.forward(input_negative, favour_negative[0], no_bias)
    )
    # outputs z_j < 0: by the negative contributions, (W + γW⁻) x⁺ + (W + γW⁺) x⁻ + b + γb⁻
    negative_total = (
        layer.forward(input_positive, *favour_negative) + layer.forward(input_negative, favour_positive[0], no_bias)
    )
    scaled_positive = relevance * (output > 0) / stabilize(positive_total, STABILIZER)
    scaled_negative = relevance * (output < 0) / stabilize(negative_total, STABILIZER)
    shape = input.shape
    return (
        input_positive * (
            layer.transpose(scaled_positive, favour_positive[0], shape)
            + layer.transpose(scaled_negative, favour_negative[0], shape)
        )
        + input_negative * (
            layer.transpose(scaled_positive, favour_negative[0], shape)
            + layer.transpose(scaled_negative, favour_positive[0], shape)
        )
    )


def zbox_rule(layer, input, relevance, low, high, zero_bias):
    """z^B: ``R_i = x_i c_i - l_i c⁺_i - h_i c⁻_i`` for inputs bounded by ``low ≤ x ≤ high``."""
    low = torch.broadcast_to(torch.as_tensor(low, dtype=torch.float64), input.shape)
    high = torch.broadcast_to(torch.as_tensor(high, dtype=torch.float64), input.shape)
    weight, bias = layer.weight, layer.bias
    if zero_bias:
        bias = torch.zeros_like(bias)
    weight_positive, weight_negative = weight.clamp(min=0), weight.clamp(max=0)
    denominator = (
        layer.forward(input, weight, bias)
        - layer.forward(low, weight_positive, bias.clamp(min=0))
        - layer.forward(high, weight_negative, bias.clamp(max=0))
    )
    scaled = relevance / stabilize(denominator, STABILIZER)
    shape = input.shape
    return (
        input * layer.transpose(scaled, weight, shape)
        - low * layer.transpose(scaled, weight_positive, shape)
        - high * layer.transpose(scaled, weight_negative, shape)
    )


def pooling_matrix(size, output_size, kernel=None, stride=None):
    """The ``(output_size, size)`` matrix of one axis of an average pool: row ``o`` averages its window.

    Adaptive pools (``kernel=None``) use the windows ``[floor(o·size/out), ceil((o+1)·size/out))``, fixed ones
    ``[o·stride, o·stride + kernel)``.
    """
    matrix = torch.zeros(output_size, size, dtype=torch.float64)
    for row in range(output_size):
        if kernel is None:
            start, stop = (row * size) // output_size, -((-(row + 1) * size) // output_size)
        else:
            start, stop = row * stride, row * stride + kernel
        matrix[row, start:stop] = 1. / (stop - start)
    return matrix


def average_pool_matrices(module, input_shape):
    """The row and column pooling matrices of an ``AvgPool2d`` or ``AdaptiveAvgPool2d`` for the given input shape."""
    height, width = input_shape[-2:]
    if isinstance(module, nn.AdaptiveAvgPool2d):
        out_height, out_width = (
            size if size is not None else full for size, full in zip(_pair(module.output_size), (height, width))
        )
        return pooling_matrix(height, out_height), pooling_matrix(width, out_width)
    if _pair(module.padding) != (0, 0) or module.ceil_mode or module.divisor_override is not None:
        raise ValueError(f'reference_lrp: {module} (padding, ceil_mode or divisor_override) is not supported')
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    return tuple(
        pooling_matrix(full, (full - k) // s + 1, k, s) for full, k, s in zip((height, width), kernel, stride)
    )


def average_pool_forward(module, input):
    rows, columns = average_pool_matrices(module, input.shape)
    return torch.einsum('oh,nchw,pw->ncop', rows, input, columns)


def norm_rule(module, input, relevance):
    """Norm: ``R_i = x_i Σ_j p_ji R_j / stab(z_j)`` with the pooling weights ``p_ji`` and ``z = P x``."""
    rows, columns = average_pool_matrices(module, input.shape)
    output = torch.einsum('oh,nchw,pw->ncop', rows, input, columns)
    scaled = relevance / stabilize(output, STABILIZER)
    return input * torch.einsum('oh,ncop,pw->nchw', rows, scaled, columns)


def max_pool_forward(module, input):
    return F.max_pool2d(
        input, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
        return_indices=True,
    )


def winner_takes_all(module, input, relevance):
    """Max-pool: each output's relevance goes to the input that won the max (PyTorch's first maximal index)."""
    _, winners = max_pool_forward(module, input)
    spread = torch.zeros_like(input).flatten(2)
    spread.scatter_add_(2, winners.flatten(2), relevance.flatten(2))
    return spread.reshape(input.shape)


def vgg_steps(model):
    """List the layers in the order a VGG forward runs them, as ``(module, block)``.

    ``block`` is 1-based in ``features`` (a max-pool closes a block) and 0 in the classifier; the module ``None``
    stands for the flattening between the feature maps and the classifier.
    """
    steps, block = [], 1
    for module in model.features:
        steps.append((module, block))
        if isinstance(module, nn.MaxPool2d):
            block += 1
    if getattr(model, 'avgpool', None) is not None:
        steps.append((model.avgpool, block))
    steps.append((None, 0))
    steps += [(module, 0) for module in model.classifier.modules() if not list(module.children())]
    return steps


def forward_step(module, input):
    """One layer's output in float64."""
    if module is None or isinstance(module, nn.Flatten):
        return input.flatten(1)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        layer = Affine(module)
        return layer.forward(input, layer.weight, layer.bias)
    if isinstance(module, nn.ReLU):
        return input.clamp(min=0)
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return average_pool_forward(module, input)
    if isinstance(module, nn.MaxPool2d):
        return max_pool_forward(module, input)[0]
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return input
    raise ValueError(f'reference_lrp: no rule for {type(module).__name__} ({module}); fold BatchNorm first')


def reference_lrp(
    model,
    input,
    target=None,
    *,
    attr_output=None,
    epsilon=0.25,
    gamma=0.1,
    low=0.,
    high=1.,
    epsilon_from_block=4,
    epsilon_linears=0,
    std_epsilon=False,
    zero_bias=False,
):
    """LRP of a VGG-like ``model`` (evaluation mode) with the seed study's rule mapping, from the formulas.

    Parameters
    ----------
    model: torch.nn.Module
        ``features`` (convolutions, ReLUs, max-pools), optional ``avgpool``, ``classifier`` (Linear, ReLU, Dropout).
        BatchNorm is not supported: fold it into the convolutions first.
    input: torch.Tensor
        ``(N, C, H, W)``; computed in float64.
    target: int or sequence of int, optional
        The class whose one-hot output relevance is propagated, one per sample or one for all; the predicted class if
        ``None``. Ignored when ``attr_output`` is given.
    attr_output: torch.Tensor, optional
        The output relevance ``(N, classes)``.
    epsilon, gamma, low, high, epsilon_from_block, epsilon_linears, std_epsilon, zero_bias:
        As in :class:`lrp_brain.composites.VGGComposite`: the first convolution gets z^B with bounds ``low``,
        ``high``; the other convolutions of blocks ``< epsilon_from_block`` LRP-γ, later ones LRP-ε; the first
        ``epsilon_linears`` linear layers LRP-ε, the others LRP-0.

    Returns
    -------
    output, relevance: torch.Tensor
        The logits and the input relevance, float64.
    """
    steps = vgg_steps(model)
    activations = [input.detach().double()]
    for module, _ in steps:
        activations.append(forward_step(module, activations[-1]))
    output = activations[-1]

    if attr_output is None:
        if target is None:
            target = output.argmax(dim=1)
        target = torch.as_tensor(target).expand(output.shape[0])
        attr_output = F.one_hot(target, output.shape[1])
    relevance = torch.as_tensor(attr_output, dtype=torch.float64).expand_as(output)

    epsilon_shift = epsilon if epsilon != 0 else STABILIZER
    first_conv = next(module for module, _ in steps if isinstance(module, nn.Conv2d))
    linear_count = sum(isinstance(module, nn.Linear) for module, _ in steps)
    for (module, block), layer_input in zip(reversed(steps), reversed(activations[:-1])):
        if isinstance(module, nn.Linear):
            # linear layers are counted from the bottom: the first epsilon_linears get LRP-ε
            if linear_count <= epsilon_linears:
                relevance = epsilon_rule(Affine(module), layer_input, relevance, epsilon_shift, std_epsilon, zero_bias)
            else:
                relevance = epsilon_rule(Affine(module), layer_input, relevance, STABILIZER, False, zero_bias)
            linear_count -= 1
        elif module is first_conv:
            relevance = zbox_rule(Affine(module), layer_input, relevance, low, high, zero_bias)
        elif isinstance(module, nn.Conv2d) and block < epsilon_from_block:
            relevance = gamma_rule(Affine(module), layer_input, relevance, gamma, zero_bias)
        elif isinstance(module, nn.Conv2d):
            relevance = epsilon_rule(Affine(module), layer_input, relevance, epsilon_shift, std_epsilon, zero_bias)
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            relevance = norm_rule(module, layer_input, relevance)
        elif isinstance(module, nn.MaxPool2d):
            relevance = winner_takes_all(module, layer_input, relevance)
        else:
            # ReLU (Pass), dropout in evaluation mode, identity, flattening: the relevance keeps its values
            relevance = relevance.reshape(layer_input.shape)
    return output, relevance


# ---------------------------------------------------------------------------------------------------------------------
# Networks to check it on, and the test modules' shared fixture

#: A width-reduced VGG16 configuration (torchvision's ``make_layers`` format): 13 convolutions in 5 blocks.
SMALL_VGG16 = [4, 4, 'M', 8, 8, 'M', 8, 8, 8, 'M', 16, 16, 16, 'M', 16, 16, 16, 'M']


def randomize_biases_and_statistics(model, generator):
    """Give every bias a N(0, 0.1) value (so the biases matter) and every BatchNorm random statistics and affine
    parameters, in place."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.data.normal_(0., .1, generator=generator)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(.5, 1.5, generator=generator)
            module.bias.data.normal_(0., .1, generator=generator)
            module.running_mean.normal_(0., .1, generator=generator)
            module.running_var.uniform_(.5, 2., generator=generator)
    return model


def random_vgg(
    cfg=SMALL_VGG16, *, batch_norm=False, avgpool=None, head=None, num_classes=3, input_size=32, seed=0
):
    """A VGG-topology network with torchvision's module names, random weights and biases, float64, evaluation mode.

    Parameters
    ----------
    cfg: list
        Conv widths and ``'M'`` (max-pool), as in ``torchvision.models.vgg.make_layers``.
    batch_norm: bool
        Put a BatchNorm (random statistics) after every convolution, like ``vgg16_bn``.
    avgpool: torch.nn.Module, optional
        Replaces VGG's ``AdaptiveAvgPool2d((7, 7))``.
    head: callable, optional
        ``head(in_features) -> classifier``; default a 32-wide copy of VGG's classifier with ``num_classes`` outputs.
    input_size: int
        The input's height and width, needed to size the classifier's first layer.
    seed: int
        Seeds the weights (He-normal, so activations keep their scale over the 13 layers) and biases.
    """
    with torch.device('meta'):  # VGG's own 4096-wide classifier is replaced below: building it would take seconds
        model = VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    model.features = make_layers(cfg, batch_norm=batch_norm)
    if avgpool is not None:
        model.avgpool = avgpool
    with torch.no_grad():
        in_features = model.avgpool(model.features(torch.zeros(1, 3, input_size, input_size))).numel()
    if head is None:
        model.classifier = nn.Sequential(
            nn.Linear(in_features, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, num_classes),
        )
    else:
        model.classifier = head(in_features)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
    return randomize_biases_and_statistics(model, generator).double().eval()


def fold_batch_norms(model):
    """A copy of ``model`` whose ``features`` have every BatchNorm folded into the convolution before it and replaced
    by an identity: ``W' = W·g/√(v+e)``, ``b' = (b - m)·g/√(v+e) + β`` with the BatchNorm's weight ``g``, bias ``β``,
    running mean ``m``, running variance ``v`` and ``eps`` ``e``."""
    folded = copy.deepcopy(model)
    layers = list(folded.features)
    for index, module in enumerate(layers):
        if not isinstance(module, nn.BatchNorm2d):
            continue
        conv = layers[index - 1]
        scale = module.weight / (module.running_var + module.eps).sqrt()
        with torch.no_grad():
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias.copy_((conv.bias - module.running_mean) * scale + module.bias)
        folded.features[index] = nn.Identity()
    return folded
