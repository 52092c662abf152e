"""rnnfast.convert: swaps the recurrent layers of an existing model between torch.nn and rnnfast."""
from torch import nn
from torch.nn.utils import parametrize

from rnnfast import modules

_TORCH_TO_RNNFAST = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.RNN: modules.RNN,
                     nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell,
                     nn.RNNCell: modules.RNNCell}
_RNNFAST_TO_TORCH = {ours: theirs for theirs, ours in _TORCH_TO_RNNFAST.items()}


def convert(model, to="rnnfast"):
    """Turns every recurrent layer and cell of `model` (the model itself included) into
    rnnfast's (to="rnnfast") or back into torch.nn's (to="torch", e.g. for export), in place,
    and returns the model.

    to="rnnfast": each torch.nn.LSTM, GRU, RNN, LSTMCell, GRUCell and RNNCell (those classes
    exactly, not subclasses with a forward of their own) becomes the rnnfast class of the same
    name. The module object stays the same: its parameters (so an optimizer built on them keeps
    working), buffers, hooks, parametrizations (weight_norm), training mode, device and dtype
    are kept, and no random number is drawn. to="torch": the reverse; a module that uses an
    rnnfast extra torch.nn has no form of (RNN / RNNCell nonlinearity='sigmoid', LSTM /
    LSTMCell activation other than 'tanh', the cell options layer_norm, zoneout and the dropout
    masks) is refused with a ValueError, before anything is changed.
    """
    if to not in ("rnnfast", "torch"):
        raise ValueError(f"convert: to must be 'rnnfast' or 'torch', got {to!r}")
    classes = _TORCH_TO_RNNFAST if to == "rnnfast" else _RNNFAST_TO_TORCH
    found = [(name, module, classes[_own_class(module)]) for name, module in model.named_modules()
             if _own_class(module) in classes]
    if to == "torch":
        for name, module, _ in found:
            extra = _rnnfast_extra(module)
            if extra:
                raise ValueError(f"convert: {name or 'the model'} ({type(module).__name__}) "
                                 f"has {extra}, which torch.nn has no form of")
    for _, module, target in found:
        if to == "rnnfast" and isinstance(module, (nn.LSTM, nn.LSTMCell)):
            module.activation = "tanh"
        elif to == "torch":
            module.__dict__.pop("activation", None)
        _set_class(module, target)
    return model


def _own_class(module):
    """The module's class as written, under the subclass a parametrization makes of it."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _rnnfast_extra(module):
    if module._options.any():
        return modules._options_repr(module._options).lstrip(", ")
    if getattr(module, "activation", "tanh") != "tanh":
        return f"activation={module.activation!r}"
    if getattr(module, "nonlinearity", "tanh") == "sigmoid":
        return "nonlinearity='sigmoid'"
    return None


def _set_class(module, target):
    if parametrize.is_parametrized(module):
        # Parametrizations put their tensors as properties on a subclass of the module's class
        # (torch.nn.utils.parametrize): the same subclass is made of the target class.
        own = dict(type(module).__dict__)
        for slot in ("__dict__", "__weakref__"):
            own.pop(slot, None)
        target = type(f"Parametrized{target.__name__}", (target,), own)
    module.__class__ = target
