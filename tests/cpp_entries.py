"""rnnfast's C++ forward entries (rnnfast._C) counted or turned off, for the tests that check
that they compute what the modules' Python forward computes."""


def count_cpp_forward_calls(monkeypatch, enabled, entry="plain_layers"):
    """Replaces one of rnnfast's C++ forward entries (_C.plain_layers of one-direction modules,
    _C.options_layers of those with options, _C.single_step of cells, _C.options_step of cells
    with options) by a wrapper that counts the calls it answers, or, with enabled=False, by one
    that always declines, so that the modules' Python forward runs. Returns the list of answered
    calls' cells."""
    from rnnfast import _ops
    original = getattr(_ops._C, entry)
    answered = []

    def counted(*args):
        result = original(*args) if enabled else NotImplemented
        if result is not NotImplemented:
            answered.append(args[0])
        return result

    monkeypatch.setattr(_ops._C, entry, counted)
    return answered
