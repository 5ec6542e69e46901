"""Which dimensions a torch reduction or normalisation runs over, for the probe
(:mod:`xtp.planning.probe`): a norm or reduction over all heads of a pair's activations needs
every head on one rank, so such a pair is kept whole."""

from __future__ import annotations

import torch

_T = torch.Tensor


def ints_in(obj) -> set[int]:
    """The ints in ``obj`` (an int, or nested lists/tuples of them; bools are not ints)."""
    if isinstance(obj, bool):
        return set()
    if isinstance(obj, int):
        return {obj}
    if isinstance(obj, (list, tuple)):
        return set().union(*(ints_in(o) for o in obj)) if obj else set()
    return set()


#: reductions over dimensions: op -> (position of its ``dim`` argument, its default: None for
#: all dimensions); a norm over all heads of a pair's activations needs every head
REDUCTIONS = {
    _T.sum: (1, None), torch.sum: (1, None), _T.mean: (1, None), torch.mean: (1, None),
    _T.var: (1, None), torch.var: (1, None), _T.std: (1, None), torch.std: (1, None),
    _T.amax: (1, None), torch.amax: (1, None), _T.logsumexp: (1, None),
    torch.logsumexp: (1, None), _T.norm: (2, None), torch.norm: (2, None),
    torch.linalg.vector_norm: (2, None), torch.nn.functional.normalize: (2, 1),
}
#: softmaxes normalise over their dimension: over a pair's features they need all of them.
#: Counted only on the activations of one projection (attention scores, made of two, are
#: normalised over keys, whose number a short probe may make equal to a width)
SOFTMAXES = frozenset({torch.softmax, _T.softmax, torch.nn.functional.softmax,
                       torch.log_softmax, _T.log_softmax, torch.nn.functional.log_softmax})
REDUCTIONS.update(dict.fromkeys(SOFTMAXES, (1, None)))
#: normalisations over trailing dimensions given by their sizes: op -> position of the sizes
NORMS = {torch.nn.functional.layer_norm: 1, torch.nn.functional.rms_norm: 1}


def reduced_sizes(func, args, kwargs) -> set[int]:
    """Sizes of the dimensions ``func(*args, **kwargs)`` reduces over (empty: no reduction)."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None:
        return set()
    if func in NORMS:
        shape = kwargs.get("normalized_shape", args[NORMS[func]] if len(args) > 1 else ())
        return ints_in(tuple(shape))
    pos, default = REDUCTIONS[func]
    dim = kwargs.get("dim", args[pos] if len(args) > pos else default)
    if dim is None:
        return set(x.shape)
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return {x.shape[d] for d in dims if isinstance(d, int) and -x.dim() <= d < x.dim()}
