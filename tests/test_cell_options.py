"""Layer normalisation, zoneout, recurrent and input dropout (rnnfast's cell options) against a
plain PyTorch loop written from the papers' equations: outputs and every gradient, float64, for
every cell, packed and not, with and without a projection, in both directions."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast
from rnnfast import functional
from cpp_entries import count_cpp_forward_calls
from thread_count import torch_threads

GATES = {"lstm": 4, "lstm_relu": 4, "gru": 3, "elman_tanh": 1, "elman_relu": 1}
ACTIVATIONS = {"lstm": torch.tanh, "lstm_relu": torch.relu, "elman_tanh": torch.tanh,
               "elman_relu": torch.relu, "gru": torch.tanh}


def layer_norm(v, gain, bias):
    """Ba, Kiros and Hinton (2016): (v - mean) / sqrt(var + eps) * gain + bias per row."""
    mean = v.mean(-1, keepdim=True)
    variance = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(variance + 1e-5) * gain
    return out + bias if bias is not None else out


def reference_layer(cell, x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih, norm_hh, norm_cell_w,
                    norm_cell_b, recurrent_mask, zoneout_mask, zoneout_cell_mask, zoneout,
                    zoneout_cell, lengths, reverse):
    steps, batch, _ = x.shape
    hidden = w_ih.shape[0] // GATES[cell]
    state = w_hh.shape[1]
    act = ACTIVATIONS[cell]
    h = hx if hx is not None else x.new_zeros(batch, state)
    c = cx if cx is not None else x.new_zeros(batch, hidden)
    outputs = [None] * steps
    for step in range(steps):
        t = steps - 1 - step if reverse else step
        xg = x[t] @ w_ih.T
        xg = (layer_norm(xg, norm_ih, b_ih) if norm_ih is not None
              else xg + b_ih if b_ih is not None else xg)
        h_in = h * recurrent_mask if recurrent_mask is not None else h
        hg = h_in @ w_hh.T
        hg = (layer_norm(hg, norm_hh, b_hh) if norm_hh is not None
              else hg + b_hh if b_hh is not None else hg)
        c_new = c
        if cell.startswith("lstm"):
            i, f, g, o = (xg + hg).chunk(4, 1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), act(g), torch.sigmoid(o)
            c_new = f * c + i * g
            c_out = layer_norm(c_new, norm_cell_w, norm_cell_b) if norm_cell_w is not None \
                else c_new
            h_new = o * act(c_out)
            if w_hr is not None:
                h_new = h_new @ w_hr.T
        elif cell == "gru":
            xr, xz, xn = xg.chunk(3, 1)
            hr, hz, hn = hg.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h_new = (1 - z) * n + z * h
        else:
            h_new = act(xg + hg)
        # Zoneout (Krueger et al. 2017): keep the previous value where the mask is 1.
        keep = zoneout_mask[t] if zoneout_mask is not None else zoneout
        h_new = keep * h + (1 - keep) * h_new
        keep_c = zoneout_cell_mask[t] if zoneout_cell_mask is not None else zoneout_cell
        c_new = keep_c * c + (1 - keep_c) * c_new
        if lengths is not None:
            active = (t < lengths).unsqueeze(1)
            h = torch.where(active, h_new, h)
            c = torch.where(active, c_new, c)
            outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
        else:
            h, c = h_new, c_new
            outputs[t] = h_new
    return torch.stack(outputs), h, c


def make_case(cell, *, layer_norm=False, zoneout=None, zoneout_cell=None, recurrent=False,
              projection=False, bias=True, packed=False, initial_state=True, steps=5, batch=4,
              input_size=3, hidden=6, seed=0):
    """The arguments of one layer_with_options call, float64, weights requiring gradients.
    zoneout: None (off), "mask" (training) or a probability (inference's expectation)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=True, scale=0.5):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
        return t.requires_grad_(grad)

    lstm = cell.startswith("lstm")
    gates = GATES[cell] * hidden
    state = 4 if projection else hidden
    args = dict(
        input=randn(steps, batch, input_size, scale=1.0),
        hx=randn(batch, state) if initial_state else None,
        cx=randn(batch, hidden) if initial_state and lstm else None,
        w_ih=randn(gates, input_size), w_hh=randn(gates, state),
        b_ih=randn(gates) if bias else None, b_hh=randn(gates) if bias else None,
        w_hr=randn(state, hidden) if projection else None,
        norm_ih_weight=(1 + randn(gates, grad=False) * 0.2).requires_grad_()
        if layer_norm else None,
        norm_hh_weight=(1 + randn(gates, grad=False) * 0.2).requires_grad_()
        if layer_norm else None,
        norm_cell_weight=(1 + randn(hidden, grad=False) * 0.2).requires_grad_()
        if layer_norm and lstm else None,
        norm_cell_bias=randn(hidden) if layer_norm and lstm and bias else None,
        recurrent_mask=(torch.rand(batch, state, generator=generator, dtype=torch.float64) > 0.3)
        .double() / 0.7 if recurrent else None,
        zoneout_mask=None, zoneout_cell_mask=None, zoneout=0.0, zoneout_cell=0.0,
        lengths=None, reverse=False)
    for name, kind, width in (("zoneout", zoneout, state), ("zoneout_cell", zoneout_cell, hidden)):
        if kind == "mask":
            args[name + "_mask"] = (torch.rand(steps, batch, width, generator=generator,
                                               dtype=torch.float64) < 0.4).double()
            args[name] = 0.4
        elif kind is not None:
            args[name] = kind
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
        args["lengths"] = lengths.sort(descending=True).values
    return args


def check_against_reference(cell, args, reverse=False):
    args = dict(args, reverse=reverse)
    ours = functional.layer_with_options(cell, **args)
    reference = reference_layer(cell, *args.values())
    lstm = cell.startswith("lstm")
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-10, atol=1e-10)
    if lstm:
        torch.testing.assert_close(ours[2], reference[2], rtol=1e-10, atol=1e-10)
    # Gradients of every input, through output, h_n and (LSTM) c_n with random weights.
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64)
               for t in reference[:3]]
    tensors = [(name, t) for name, t in args.items()
               if isinstance(t, torch.Tensor) and t.requires_grad]

    def loss(results):
        count = 3 if lstm else 2
        return sum((r * w).sum() for r, w in zip(results[:count], weights[:count]))

    ours_grads = torch.autograd.grad(loss(ours), [t for _, t in tensors])
    reference_grads = torch.autograd.grad(loss(reference), [t for _, t in tensors])
    for (name, _), got, expected in zip(tensors, ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


CELLS = list(GATES)
OPTION_SETS = {
    "layer_norm": dict(layer_norm=True),
    "zoneout_train": dict(zoneout="mask", zoneout_cell="mask"),
    "zoneout_eval": dict(zoneout=0.3, zoneout_cell=0.2),
    "recurrent_dropout": dict(recurrent=True),
    "all": dict(layer_norm=True, zoneout="mask", zoneout_cell="mask", recurrent=True),
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_matches_reference(cell, options, packed, reverse):
    option_set = dict(OPTION_SETS[options])
    if not cell.startswith("lstm"):
        option_set.pop("zoneout_cell", None)
    args = make_case(cell, packed=packed, seed=hash((cell, options, packed)) % 1000, **option_set)
    check_against_reference(cell, args, reverse)


@pytest.mark.parametrize("case", [
    dict(projection=True, layer_norm=True, zoneout="mask", zoneout_cell="mask", recurrent=True),
    dict(projection=True, zoneout=0.25, packed=True),
    dict(bias=False, layer_norm=True, zoneout="mask"),
    dict(initial_state=False, layer_norm=True, recurrent=True, packed=True),
    dict(steps=1, batch=1, hidden=3, layer_norm=True, zoneout="mask"),
    dict(steps=7, batch=9, hidden=40, input_size=33, layer_norm=True, zoneout="mask",
         zoneout_cell="mask", recurrent=True, packed=True),
], ids=["projection-all", "projection-zoneout-packed", "no-bias", "zero-state", "one-step",
        "vector-tails"])
def test_lstm_variants_match_reference(case):
    check_against_reference("lstm", make_case("lstm", **case))


@pytest.mark.parametrize("cell", ["gru", "elman_tanh"])
def test_gru_elman_without_bias_or_state(cell):
    args = make_case(cell, bias=False, initial_state=False, layer_norm=True, zoneout="mask",
                     recurrent=True, packed=True, hidden=20, batch=5)
    check_against_reference(cell, args)


def test_large_layer_matches_reference():
    # Products large enough to run in the BLAS, rows split over the threads.
    args = make_case("lstm", layer_norm=True, zoneout="mask", zoneout_cell="mask", recurrent=True,
                     steps=4, batch=32, input_size=64, hidden=96)
    check_against_reference("lstm", args)


@pytest.mark.parametrize("cell,hidden", [("lstm", 120), ("gru", 140), ("elman_tanh", 240)])
def test_single_row_layer_in_gate_panels_matches_reference(cell, hidden):
    # One batch row whose per-step products (48K to 64K multiply-adds) the tiled kernel would
    # run: in gate panels (the backward's with AVX2), their units split over the threads, both
    # directions.
    args = make_case(cell, layer_norm=True, zoneout="mask", recurrent=True, steps=6, batch=1,
                     input_size=5, hidden=hidden)
    with torch_threads(2):
        check_against_reference(cell, args)
        check_against_reference(cell, args, reverse=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("options", [dict(layer_norm=True), dict(zoneout="mask")],
                         ids=["layer_norm", "zoneout"])
def test_parameter_sums_over_many_steps_match_reference(cell, options):
    # The normalisations' and the biases' gradients over more steps than a batch row sums in
    # one run before adding them into its totals, packed rows of other lengths, both directions.
    args = make_case(cell, packed=True, steps=150, batch=3, input_size=3, hidden=4, **options)
    check_against_reference(cell, args)
    check_against_reference(cell, args, reverse=True)


def test_float32_layer_is_close_to_float64():
    args = make_case("lstm", layer_norm=True, zoneout="mask", zoneout_cell="mask",
                     recurrent=True, packed=True, hidden=24)
    expected = functional.layer_with_options("lstm", **args)
    single = {name: (t.detach().float() if isinstance(t, torch.Tensor) and t.is_floating_point()
                     else t) for name, t in args.items()}
    got = functional.layer_with_options("lstm", **single)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["expanded", "batch_major", "units_strided"])
def test_output_gradient_is_read_at_its_strides(layout):
    # The backward reads the rows of output's gradient where they lie (an expanded gradient, as
    # of output.sum(), and a batch-major one are not copied): the same gradients as from the
    # same values contiguous.
    args = make_case("lstm", layer_norm=True, zoneout="mask", recurrent=True, packed=True)
    output = functional.layer_with_options("lstm", **args)[0]
    steps, batch, state = output.shape
    generator = torch.Generator().manual_seed(2)
    if layout == "expanded":
        grad = torch.full((), 0.7, dtype=torch.float64).expand(steps, batch, state)
    elif layout == "batch_major":
        grad = torch.randn(batch, steps, state, generator=generator,
                           dtype=torch.float64).transpose(0, 1)
    else:
        grad = torch.randn(steps, state, batch, generator=generator,
                           dtype=torch.float64).transpose(1, 2)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(output, tensors, grad, retain_graph=True)
    expected = torch.autograd.grad(output, tensors, grad.contiguous())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_graph_node_keeps_torch_autograd_rules(cell):
    # The layer's graph node follows autograd's rules for what it saved: a retained graph
    # differentiates twice to the same gradients, a released one refuses a second backward, and
    # an input changed in place after the forward is refused with torch's error.
    args = make_case(cell, layer_norm=True, zoneout="mask", recurrent=True, packed=True)
    tensors = [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    output = functional.layer_with_options(cell, **args)[0]
    assert output.grad_fn.name() == "rnnfast::LayerWithOptionsBackward"
    first = torch.autograd.grad(output.sum(), tensors, retain_graph=True)
    second = torch.autograd.grad(output.sum(), tensors)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(output.sum(), tensors)
    output = functional.layer_with_options(cell, **args)[0]
    with torch.no_grad():
        args["w_hh"].mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(output.sum(), tensors)


# ---- the modules ----------------------------------------------------------------------------

def module_reference(module, kind, x, hx, lengths, training):
    """The module's stack as reference_layer calls, drawing the masks as the module documents
    (per layer, per direction: input dropout [B, I] and recurrent dropout [B, P] masks by
    bernoulli_, zoneout masks of h [T, B, P] and of c [T, B, H] by functional._zoneout_mask,
    whose draws test_zoneout_masks_* check) from torch's generator, as rnnfast does."""
    options = module._options
    lstm = kind.startswith("lstm")
    directions = 2 if module.bidirectional else 1
    steps, batch = x.shape[:2]
    h_n, c_n = [], []
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")

            def get(name):
                return getattr(module, name + suffix, None)

            k = layer * directions + direction
            state = get("weight_hh").shape[1]
            x_in, masks = layer_input, dict(recurrent_mask=None, zoneout_mask=None,
                                            zoneout_cell_mask=None)
            if training:
                if options.input_dropout:
                    x_in = layer_input * torch.empty(batch, layer_input.shape[2],
                                                     dtype=x.dtype).bernoulli_(
                        1 - options.input_dropout).div_(1 - options.input_dropout)
                if options.recurrent_dropout:
                    p = options.recurrent_dropout
                    masks["recurrent_mask"] = torch.empty(batch, state, dtype=x.dtype).bernoulli_(
                        1 - p).div_(1 - p)
                if options.zoneout:
                    masks["zoneout_mask"] = functional._zoneout_mask(
                        (steps, batch, state), options.zoneout, x)
                if options.zoneout_cell:
                    masks["zoneout_cell_mask"] = functional._zoneout_mask(
                        (steps, batch, module.hidden_size), options.zoneout_cell, x)
            out, h, c = reference_layer(
                kind, x_in, hx[0][k] if hx else None, hx[1][k] if hx and lstm else None,
                get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                get("weight_hr"), get("layer_norm_ih_weight"), get("layer_norm_hh_weight"),
                get("layer_norm_cell_weight"), get("layer_norm_cell_bias"), **masks,
                zoneout=options.zoneout, zoneout_cell=options.zoneout_cell, lengths=lengths,
                reverse=direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 2)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


@pytest.mark.parametrize("kind,training,packed", list(itertools.product(
    ["lstm", "gru", "elman_tanh"], [True, False], [False, True])))
def test_module_matches_reference(kind, training, packed):
    torch.manual_seed(3)
    options = dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.25, input_dropout=0.2)
    if kind == "lstm":
        module = rnnfast.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=4,
                              zoneout_cell=0.15, dtype=torch.float64, **options)
    elif kind == "gru":
        module = rnnfast.GRU(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64,
                             **options)
    else:
        module = rnnfast.RNN(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64,
                             **options)
    module.train(training)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 5, 3, 1]) if packed else None
    inputs = pack_padded_sequence(x, lengths) if packed else x
    torch.manual_seed(11)
    output, state = module(inputs)
    if packed:
        output, _ = pad_packed_sequence(output)
    torch.manual_seed(11)
    ref_output, ref_h, ref_c = module_reference(module, kind, x, None, lengths, training)
    torch.testing.assert_close(output, ref_output, rtol=1e-10, atol=1e-10)
    h_n = state[0] if kind == "lstm" else state
    torch.testing.assert_close(h_n, ref_h, rtol=1e-10, atol=1e-10)
    if kind == "lstm":
        torch.testing.assert_close(state[1], ref_c, rtol=1e-10, atol=1e-10)
    # The gradients of every parameter.
    weights = torch.randn_like(ref_output)
    ours = torch.autograd.grad((output * weights).sum(), list(module.parameters()))
    expected = torch.autograd.grad((ref_output * weights).sum(), list(module.parameters()))
    for (name, _), got, want in zip(module.named_parameters(), ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_state_dict_names_and_defaults():
    plain = rnnfast.LSTM(4, 6, num_layers=2)
    assert set(plain.state_dict()) == set(torch.nn.LSTM(4, 6, num_layers=2).state_dict())
    normed = rnnfast.LSTM(4, 6, num_layers=2, bidirectional=True, layer_norm=True)
    names = set(normed.state_dict()) - set(plain.state_dict())
    expected = {f"layer_norm_{part}{suffix}" for part in
                ("ih_weight", "hh_weight", "cell_weight", "cell_bias")
                for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse")}
    assert expected <= names
    assert torch.equal(normed.layer_norm_ih_weight_l1, torch.ones(24))
    assert torch.equal(normed.layer_norm_cell_bias_l0_reverse, torch.zeros(6))
    normed.reset_parameters()
    assert torch.equal(normed.layer_norm_hh_weight_l0, torch.ones(24))
    gru = rnnfast.GRU(4, 6, layer_norm=True, bias=False)
    assert {n for n in gru.state_dict() if n.startswith("layer_norm")} == {
        "layer_norm_ih_weight_l0", "layer_norm_hh_weight_l0"}
    assert "layer_norm=True" in repr(normed)
    assert "zoneout=0.1" in repr(rnnfast.RNN(3, 3, zoneout=0.1))


def test_masks_follow_the_seed_and_eval_is_deterministic():
    module = rnnfast.LSTM(3, 5, zoneout=0.4, zoneout_cell=0.3, recurrent_dropout=0.3,
                          input_dropout=0.2)
    x = torch.randn(8, 2, 3)
    torch.manual_seed(5)
    first = module(x)[0]
    torch.manual_seed(5)
    second = module(x)[0]
    third = module(x)[0]
    assert torch.equal(first, second)
    assert not torch.equal(second, third)
    module.eval()
    assert torch.equal(module(x)[0], module(x)[0])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.95])
def test_zoneout_masks_keep_each_unit_with_probability_p(p):
    """The CPU's zoneout masks (functional._zoneout_mask, rnnfast::random_mask): 0 or 1, a share
    p of ones, each independent of its neighbours, and a new mask at each draw."""
    shape = (200, 16, 65)  # an odd last size: the generator's pairs of elements straddle rows
    mask = functional._zoneout_mask(shape, p, torch.empty(0))
    n = mask.numel()
    assert mask.shape == shape and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - p) <= 5 * (p * (1 - p) / n) ** 0.5
    if 0 < p < 1:
        flat = mask.flatten()
        # Both elements of a pair are ones with probability p^2: within a generator output (lag
        # 1), across outputs, rows and steps.
        for lag in (1, 2, 65, 16 * 65):
            both = (flat[:-lag] * flat[lag:]).mean().item()
            assert abs(both - p * p) <= 5 * (p * p * (1 - p * p) / (n - lag)) ** 0.5, lag
        assert not torch.equal(mask, functional._zoneout_mask(shape, p, torch.empty(0)))


def test_zoneout_masks_follow_the_seed_on_any_number_of_threads():
    masks = []
    for count in (1, 2, 3):
        with torch_threads(count):
            torch.manual_seed(4)
            masks.append(functional._zoneout_mask((300, 20, 33), 0.3,
                                                  torch.empty(0, dtype=torch.float64)))
    assert masks[0].dtype == torch.float64
    assert all(torch.equal(masks[0], mask) for mask in masks[1:])
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.rnnfast.random_mask(torch.tensor(1), [4], 1.5, torch.float32)


def test_zoneout_in_evaluation_mixes_in_the_previous_state():
    torch.manual_seed(0)
    plain = rnnfast.GRU(4, 5)
    zoned = rnnfast.GRU(4, 5, zoneout=0.3).eval()
    zoned.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 4)
    plain_output = plain(x)[0]
    zoned_output = zoned(x)[0]
    # The first step starts from h = 0: its output is 0.7 times the plain layer's.
    torch.testing.assert_close(zoned_output[0], 0.7 * plain_output[0])
    assert not torch.allclose(zoned_output[1:], plain_output[1:])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_dropouts_in_evaluation_give_torch_nn_layer(kind, monkeypatch):
    # Recurrent and input dropout act in training only: an evaluating layer with them is
    # torch.nn's layer, outputs, final states and gradients, and runs the plain layer's op.
    def refuse(*args, **kwargs):
        raise AssertionError("an evaluating layer with dropouts only ran the options' op")

    torch.manual_seed(1)
    reference = getattr(torch.nn, kind)(4, 5, num_layers=2, bidirectional=True).double()
    module = getattr(rnnfast, kind)(4, 5, num_layers=2, bidirectional=True,
                                    recurrent_dropout=0.4, input_dropout=0.3).double().eval()
    module.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    with monkeypatch.context() as patch:
        patch.setattr(functional, "stacked_with_options", refuse)
        output, state = module(x)
    ref_output, ref_state = reference(x)
    torch.testing.assert_close(output, ref_output, rtol=1e-10, atol=1e-12)
    for got, want in zip(state if kind == "LSTM" else (state,),
                         ref_state if kind == "LSTM" else (ref_state,)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(output)
    ours = torch.autograd.grad((output * weights).sum(), [x, *module.parameters()])
    expected = torch.autograd.grad((ref_output * weights).sum(), [x, *reference.parameters()])
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # In training the masks act.
    module.train()
    assert not torch.allclose(module(x)[0], ref_output)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_input_dropout_alone_runs_torch_nn_layer_on_the_dropped_input(kind, monkeypatch):
    # A training layer whose only option is input_dropout is torch.nn's layer on x times the
    # mask (drawn per layer and direction), and runs the plain layer's op, not the options'.
    def refuse(*args, **kwargs):
        raise AssertionError("a layer with input dropout only ran the options' op")

    torch.manual_seed(2)
    reference = getattr(torch.nn, kind)(4, 5, bidirectional=True).double()
    module = getattr(rnnfast, kind)(4, 5, bidirectional=True, input_dropout=0.3).double()
    module.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(8)
    with monkeypatch.context() as patch:
        patch.setattr(functional, "layer_with_options", refuse)
        output = module(x)[0]
    torch.manual_seed(8)
    masks = [functional._keep_mask((3, 4), 0.3, x, x.dtype) for _ in range(2)]
    forward, backward = (getattr(torch.nn, kind)(4, 5).double() for _ in range(2))
    for direction, suffix in ((forward, ""), (backward, "_reverse")):
        direction.load_state_dict({name.replace(suffix, ""): value
                                   for name, value in reference.state_dict().items()
                                   if name.endswith("_l0" + suffix)})
    expected = torch.cat([forward(x * masks[0])[0],
                          backward((x * masks[1]).flip(0))[0].flip(0)], 2)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(output)
    ours = torch.autograd.grad((output * weights).sum(), x)
    want = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("argument", ["zoneout", "recurrent_dropout", "input_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_probabilities_raise(argument, value):
    with pytest.raises(ValueError, match=f"GRU: {argument} should be a number in range"):
        rnnfast.GRU(3, 4, **{argument: value})


def test_bad_option_arguments_raise():
    with pytest.raises(TypeError, match="layer_norm must be a bool"):
        rnnfast.LSTM(3, 4, layer_norm="yes")
    with pytest.raises(ValueError, match="LSTM: zoneout_cell should be a number"):
        rnnfast.LSTM(3, 4, zoneout_cell=2)
    with pytest.raises(TypeError):
        rnnfast.GRU(3, 4, zoneout_cell=0.1)  # GRU has no cell state
    args = make_case("gru", layer_norm=True)
    with pytest.raises(RuntimeError, match="norm_ih_weight must have shape"):
        functional.layer_with_options("gru", **dict(args, norm_ih_weight=torch.ones(5,
                                                                                   dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="zoneout_cell_mask is only for LSTM"):
        functional.layer_with_options("gru", **dict(args, zoneout_cell_mask=torch.zeros(5, 4, 6,
                                                                                        dtype=torch.float64)))


def test_bfloat16_layer_runs_in_float():
    torch.manual_seed(0)
    module = rnnfast.LSTM(4, 8, layer_norm=True, zoneout=0.2).eval()
    x = torch.randn(5, 3, 4)
    expected = module(x)[0]
    got = module.to(torch.bfloat16)(x.bfloat16())[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = rnnfast.LSTM(4, 6, num_layers=2, layer_norm=True, zoneout=0.2, zoneout_cell=0.1,
                          recurrent_dropout=0.2).eval()
    x = torch.randn(5, 3, 4, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    expected = module(x)[0]
    got = compiled(x)[0]
    torch.testing.assert_close(got, expected)
    grad_expected = torch.autograd.grad(expected.sum(), x)[0]
    grad_got = torch.autograd.grad(got.sum(), x)[0]
    torch.testing.assert_close(grad_got, grad_expected)


@pytest.mark.parametrize("kind", ["lstm", "gru", "elman_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_cells_match_reference(kind, training):
    torch.manual_seed(2)
    lstm = kind == "lstm"
    module_class = {"lstm": rnnfast.LSTMCell, "gru": rnnfast.GRUCell,
                    "elman_tanh": rnnfast.RNNCell}[kind]
    extra = dict(zoneout_cell=0.2) if lstm else {}
    cell = module_class(5, 6, layer_norm=True, zoneout=0.3, dtype=torch.float64, **extra)
    cell.train(training)
    with torch.no_grad():
        for parameter in cell.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    x = torch.randn(4, 5, dtype=torch.float64)
    h = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(9)
    result = cell(x, (h, c) if lstm else h)
    h_new, c_new = result if lstm else (result, None)
    torch.manual_seed(9)
    masks = {}
    if training:
        masks["zoneout_mask"] = functional._zoneout_mask((1, 4, 6), 0.3, x)
        if lstm:
            masks["zoneout_cell_mask"] = functional._zoneout_mask((1, 4, 6), 0.2, x)
    _, ref_h, ref_c = reference_layer(
        kind, x.unsqueeze(0), h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
        None, cell.layer_norm_ih_weight, cell.layer_norm_hh_weight,
        getattr(cell, "layer_norm_cell_weight", None), getattr(cell, "layer_norm_cell_bias", None),
        None, masks.get("zoneout_mask"), masks.get("zoneout_cell_mask"), 0.3, 0.2 if lstm else 0.0,
        None, False)
    torch.testing.assert_close(h_new, ref_h, rtol=1e-10, atol=1e-10)
    outputs, references = [h_new], [ref_h]
    if lstm:
        torch.testing.assert_close(c_new, ref_c, rtol=1e-10, atol=1e-10)
        outputs.append(c_new)
        references.append(ref_c)
    weights = [torch.randn_like(t) for t in references]
    parameters = list(cell.parameters())
    ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), parameters)
    expected = torch.autograd.grad(sum((r * w).sum() for r, w in zip(references, weights)),
                                   parameters)
    for (name, _), got, want in zip(cell.named_parameters(), ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_cell_option_arguments():
    cell = rnnfast.LSTMCell(3, 4, layer_norm=True, bias=False)
    assert {name for name, _ in cell.named_parameters()} == {
        "weight_ih", "weight_hh", "layer_norm_ih_weight", "layer_norm_hh_weight",
        "layer_norm_cell_weight"}
    assert "layer_norm=True" in repr(cell)
    assert set(rnnfast.GRUCell(3, 4).state_dict()) == set(torch.nn.GRUCell(3, 4).state_dict())
    with pytest.raises(ValueError, match="RNNCell: zoneout should be a number in range"):
        rnnfast.RNNCell(3, 4, zoneout=1.0)
    with pytest.raises(TypeError):
        rnnfast.GRUCell(3, 4, recurrent_dropout=0.1)  # a per-sequence mask: layers only


def test_torch_compile_fullgraph_training_draws_the_eager_masks():
    torch.manual_seed(0)
    module = rnnfast.GRU(4, 6, num_layers=2, bidirectional=True, layer_norm=True, zoneout=0.2,
                         recurrent_dropout=0.2, input_dropout=0.1)
    x = torch.randn(5, 3, 4)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for run in (module, compiled):
        module.zero_grad()
        torch.manual_seed(1)
        output = run(x)[0]
        output.sum().backward()
        results.append((output.detach(), module.weight_hh_l1_reverse.grad.clone(),
                        module.layer_norm_ih_weight_l0.grad.clone()))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # torch deprecates tracing
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_jit_trace_gives_the_eager_layer(kind):
    # A trace records the options' op, saving for a backward in any grad mode (its own check
    # runs under no_grad, which recorded another graph before): the traced module gives eager's
    # outputs at other sizes, and its gradients.
    torch.manual_seed(6)
    module = getattr(rnnfast, kind)(3, 4, num_layers=2, bidirectional=True, layer_norm=True,
                                    zoneout=0.1, dtype=torch.float64).eval()
    traced = torch.jit.trace(module, (torch.randn(5, 2, 3, dtype=torch.float64),))
    x = torch.randn(7, 3, 3, dtype=torch.float64, requires_grad=True)
    got, expected = traced(x)[0], module(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), x)[0],
                               torch.autograd.grad((expected * weights).sum(), x)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck(cell):
    args = make_case(cell, layer_norm=True, zoneout="mask", recurrent=True, packed=True,
                     steps=3, batch=3, hidden=4,
                     zoneout_cell="mask" if cell == "lstm" else None)
    names = [name for name, t in args.items() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(*tensors):
        return functional.layer_with_options(cell, **dict(args, **dict(zip(names, tensors))))

    assert torch.autograd.gradcheck(run, [args[name] for name in names])


@pytest.mark.parametrize("module", [
    lambda: rnnfast.LSTM(3, 4, layer_norm=True), lambda: rnnfast.GRU(3, 4, zoneout=0.1),
    lambda: rnnfast.RNN(3, 4, recurrent_dropout=0.2), lambda: rnnfast.LSTMCell(3, 4, zoneout=0.1),
], ids=["lstm-layer-norm", "gru-zoneout", "rnn-recurrent-dropout", "lstm-cell-zoneout"])
def test_onnx_export_refuses_cell_options(module, tmp_path):
    # ONNX's recurrent operators have none of them: exporting torch.nn's layer in their place
    # would write another model.
    model = module().eval()
    x = torch.randn(2, 3) if isinstance(model, torch.nn.RNNCellBase) else torch.randn(5, 2, 3)
    with pytest.raises(torch.onnx.OnnxExporterError, match="cannot be exported to ONNX"):
        torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"), dynamo=False)


def test_convert_to_torch_refuses_cell_options():
    model = torch.nn.Sequential(rnnfast.GRU(3, 4, layer_norm=True, zoneout=0.1))
    with pytest.raises(ValueError, match="has layer_norm=True, zoneout=0.1, which torch.nn"):
        rnnfast.convert(model, to="torch")
    assert isinstance(model[0], rnnfast.GRU)


def test_parametrized_and_functional_norm_weights_are_used():
    torch.manual_seed(0)
    module = rnnfast.LSTM(3, 4, layer_norm=True).eval()
    x = torch.randn(5, 2, 3)
    plain = module(x)[0]
    doubled = {"layer_norm_cell_weight_l0": 2 * module.layer_norm_cell_weight_l0.detach()}
    functional_output = torch.func.functional_call(module, doubled, (x,))[0]
    assert not torch.allclose(functional_output, plain)
    torch.nn.utils.parametrize.register_parametrization(
        module, "layer_norm_cell_weight_l0", _Double())
    torch.testing.assert_close(module(x)[0], functional_output)


class _Double(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("layout", ["batch_first", "unbatched", "unsorted-packed"])
def test_module_layouts_and_initial_state(layout):
    # The module's input and state handling (batch_first, unbatched, a packed sequence whose
    # rows are reordered, hx given) is the plain layers'; the options layer sees time-major rows.
    torch.manual_seed(4)
    module = rnnfast.LSTM(3, 5, num_layers=2, bidirectional=True, layer_norm=True, zoneout=0.2,
                          zoneout_cell=0.1, recurrent_dropout=0.2, input_dropout=0.1,
                          batch_first=layout == "batch_first", dtype=torch.float64)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    hx = (torch.randn(4, 4, 5, dtype=torch.float64), torch.randn(4, 4, 5, dtype=torch.float64))
    lengths = torch.tensor([3, 6, 1, 4])
    if layout == "batch_first":
        inputs, state, lengths = x.transpose(0, 1).contiguous(), hx, None
    elif layout == "unbatched":
        x, hx, lengths = x[:, :1], (hx[0][:, :1], hx[1][:, :1]), None
        inputs, state = x[:, 0], (hx[0][:, 0], hx[1][:, 0])
    else:
        inputs, state = pack_padded_sequence(x, lengths, enforce_sorted=False), hx
    torch.manual_seed(8)
    output, (h_n, c_n) = module(inputs, state)
    if layout == "batch_first":
        output = output.transpose(0, 1)
    elif layout == "unbatched":
        output, h_n, c_n = output.unsqueeze(1), h_n.unsqueeze(1), c_n.unsqueeze(1)
    else:
        output, _ = pad_packed_sequence(output)
    # The reference runs the rows in the packed sequence's order (longest first), as the
    # module does, so the masks' rows match.
    order = torch.argsort(lengths, descending=True, stable=True) if lengths is not None \
        else torch.arange(x.shape[1])
    torch.manual_seed(8)
    ref_output, ref_h, ref_c = module_reference(
        module, "lstm", x[:, order], (hx[0][:, order], hx[1][:, order]),
        lengths[order] if lengths is not None else None, True)
    unsort = torch.argsort(order)
    torch.testing.assert_close(output, ref_output[:, unsort], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_n, ref_h[:, unsort], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c_n, ref_c[:, unsort], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell,case", [
    ("lstm", dict(layer_norm=True, zoneout="mask", zoneout_cell="mask", recurrent=True,
                  batch=32, hidden=96, input_size=64, steps=6)),
    ("gru", dict(layer_norm=True, packed=True, batch=40, hidden=200, input_size=100, steps=5)),
    ("elman_tanh", dict(zoneout="mask", recurrent=True, batch=64, hidden=300, input_size=300,
                        steps=4)),
    ("lstm", dict(layer_norm=True, packed=True, batch=24, hidden=32, input_size=16, steps=150)),
    # Every row's sums flush at the same step on all threads at once.
    ("lstm", dict(layer_norm=True, batch=16, hidden=64, input_size=64, steps=100)),
    # Too few units per step for the plain engine to split its cells: these are split.
    ("lstm", dict(layer_norm=True, zoneout="mask", batch=20, hidden=200, input_size=50, steps=4)),
    # Where a core's cache holds W_hh (2 MiB of L2 cache): rows per thread in gate panels, on 3
    # threads shares of 9, 9 and 7 rows, each in row tiles of its own.
    ("elman_tanh", dict(zoneout="mask", batch=25, hidden=300, input_size=50, steps=5)),
], ids=["lstm-rows-per-thread", "gru-packed", "elman-blas", "lstm-norm-many-steps",
        "lstm-norm-flush-together", "lstm-norm-cells-split", "elman-uneven-shares"])
def test_results_are_the_same_on_any_number_of_threads(cell, case):
    # Rows per thread, or cells split per step; the gradients' sums in an order fixed by the
    # shape (the weights' GEMMs; the biases' and the normalisations' sums per batch row over the
    # steps, then over the rows in order): float32 results bit for bit the same on 1, 2 and 3
    # threads.
    args = {name: t.detach().float().requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for name, t in make_case(cell, **case).items()}
    names = [name for name, t in args.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    results = []
    for count in (1, 2, 3):
        with torch_threads(count):
            output, h_n, _ = functional.layer_with_options(cell, **args)
            grads = torch.autograd.grad((output * output).sum() + h_n.sum(),
                                        [args[name] for name in names])
        results.append([output, h_n, *grads])
    for other in results[1:]:
        for name, one, two in zip(["output", "h_n", *names], results[0], other):
            assert torch.equal(one, two), name


def test_other_devices_are_refused_with_the_reason(monkeypatch):
    # The CUDA engine's kernels of the options' op are opt-in (RNNFAST_CUDA_CELL_OPTIONS=1, not
    # yet validated on a GPU); without it any non-CPU tensor gets the reason and how to opt in
    # (a meta tensor stands in for a CUDA one here).
    monkeypatch.delenv("RNNFAST_CUDA_CELL_OPTIONS", raising=False)
    module = rnnfast.GRU(3, 4, zoneout=0.1, device="meta")
    with pytest.raises(NotImplementedError, match="run on the CPU engine only so far") as refused:
        module(torch.randn(5, 2, 3, device="meta"))
    assert "RNNFAST_CUDA_CELL_OPTIONS=1" in str(refused.value)
    assert "not yet validated on a GPU" in str(refused.value)
    # The opt-in is for CUDA tensors: other devices stay refused.
    monkeypatch.setenv("RNNFAST_CUDA_CELL_OPTIONS", "1")
    with pytest.raises(NotImplementedError, match="run on the CPU engine only so far"):
        module(torch.randn(5, 2, 3, device="meta"))


# (vmap runs the ops, which have no batching rule, once per slice, and says so.)
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet")
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_func_grad_and_per_sample_gradients(kind):
    # torch.func.grad of a layer with options gives autograd's gradients, and vmap(grad) the
    # gradient of each sample (per-sample gradients), as a loop of autograd calls does.
    torch.manual_seed(4)
    module = getattr(rnnfast, kind)(3, 4, num_layers=2, layer_norm=True, zoneout=0.2,
                                    dtype=torch.float64).eval()
    params = dict(module.named_parameters())

    def loss(parameters, x):
        return torch.func.functional_call(module, parameters, (x,))[0].pow(2).sum()

    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = torch.func.grad(loss)(params, x)
    expected = torch.autograd.grad(loss(params, x), list(params.values()))
    for name, want in zip(params, expected):
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)
    samples = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, samples)
    for index, sample in enumerate(samples):
        expected = torch.autograd.grad(loss(params, sample), list(params.values()))
        for name, want in zip(params, expected):
            torch.testing.assert_close(per_sample[name][index], want, rtol=1e-10, atol=1e-12)


# (torch.func.jvp's first call scripts functions of torch's own, which torch.jit deprecates.)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_func_higher_derivatives_raise():
    # Nested grad transforms would need the options' backward differentiated, and forward mode
    # (torch.func's or dual tensors) a derivative the layer does not have: they raise rather
    # than return a derivative without those terms.
    torch.manual_seed(0)
    module = rnnfast.GRU(3, 4, layer_norm=True, dtype=torch.float64).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(x):
        return module(x)[0].pow(2).sum()

    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.grad(lambda x: torch.func.grad(loss)(x).pow(2).sum())(x)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.jvp(loss, (x,), (torch.ones_like(x),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            module(dual)
        # Also where nothing requires a gradient (no graph is recorded).
        with torch.no_grad(), pytest.raises(RuntimeError, match="forward-mode AD"):
            module(dual)


def test_second_derivatives_raise():
    # The options' backward has no derivative: a gradient asked for with create_graph=True (to be
    # differentiated again) raises rather than missing the terms through it.
    torch.manual_seed(0)
    module = rnnfast.LSTM(3, 4, layer_norm=True, dtype=torch.float64).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(module(x)[0].sum(), module.weight_hh_l0, create_graph=True)
    # Without create_graph the first derivative is as before.
    assert torch.autograd.grad(module(x)[0].sum(), x)[0].shape == x.shape


CELL_MODULES = {"lstm": rnnfast.LSTMCell, "gru": rnnfast.GRUCell, "elman_tanh": rnnfast.RNNCell}


@pytest.mark.parametrize("kind", list(CELL_MODULES))
@pytest.mark.parametrize("options,training", [
    (dict(layer_norm=True), True), (dict(layer_norm=True), False), (dict(zoneout=0.3), False),
    (dict(layer_norm=True, zoneout=0.4), False)], ids=str)
@pytest.mark.parametrize("hx_given", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_step_in_cpp_equals_the_python_forward(kind, options, training, hx_given, bias,
                                                    monkeypatch):
    """A cell with options whose step draws no masks (layer_norm, zoneout in evaluation) runs its
    step in C++ (_C.options_step): bit for bit the results and gradients (input, state and
    every parameter) of its Python forward."""
    lstm = kind == "lstm"
    extra = dict(zoneout_cell=0.2) if lstm and "zoneout" in options else {}
    cell = CELL_MODULES[kind](5, 6, bias=bias, dtype=torch.float64, **options, **extra)
    cell.train(training)
    with torch.no_grad():
        for parameter in cell.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    batch = int(torch.randint(1, 5, ()))
    x = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(batch, 6, dtype=torch.float64, requires_grad=True)
              for _ in range(2 if lstm else 1)]
    hx = (tuple(states) if lstm else states[0]) if hx_given else None
    results = {}
    for enabled in (True, False):
        with monkeypatch.context() as patch:
            answered = count_cpp_forward_calls(patch, enabled, "options_step")
            result = cell(x, hx)
        assert len(answered) == (1 if enabled else 0), f"options_step answered {answered}"
        outputs = list(result) if lstm else [result]
        leaves = [x, *states] if hx_given else [x]
        weights = [torch.ones_like(o) * (i + 1) for i, o in enumerate(outputs)]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)),
                                    [*leaves, *cell.parameters()])
        results[enabled] = [o.detach() for o in outputs] + list(grads)
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want)


def test_cell_step_in_cpp_declines_what_python_handles(monkeypatch):
    """What the C++ step of cells with options leaves to the Python forward: zoneout masks to
    draw (training), a gain that a parametrization computes, unbatched input, bfloat16, a
    forward-mode AD tangent. Each gives the Python forward's results or error."""
    torch.manual_seed(0)
    answered = count_cpp_forward_calls(monkeypatch, True, "options_step")
    x = torch.randn(3, 4)
    training = rnnfast.GRUCell(4, 5, zoneout=0.3)
    torch.manual_seed(1)
    h = training(x)
    torch.manual_seed(1)
    mask = functional._zoneout_mask((1, 3, 5), 0.3, x)
    _, expected, _ = reference_layer("gru", x.unsqueeze(0), None, None, training.weight_ih,
                                     training.weight_hh, training.bias_ih, training.bias_hh, None,
                                     None, None, None, None, None, mask, None, 0.3, 0.0, None,
                                     False)
    torch.testing.assert_close(h, expected)
    assert answered == [], "zoneout in training draws masks: the Python forward"

    cell = rnnfast.LSTMCell(4, 5, layer_norm=True).eval()
    plain = cell(x)[0]
    assert answered == ["lstm"]
    torch.nn.utils.parametrize.register_parametrization(cell, "layer_norm_ih_weight", _Double())
    doubled = cell(x)[0]
    assert not torch.allclose(doubled, plain), "the parametrized gain must be used"
    assert answered == ["lstm"], "a parametrized gain: the Python forward"

    unbatched = rnnfast.GRUCell(4, 5, layer_norm=True).eval()
    torch.testing.assert_close(unbatched(x[0]), unbatched(x)[0])
    assert answered == ["lstm", "gru"], "unbatched input: the Python forward (batched: C++)"

    bf16 = rnnfast.GRUCell(4, 5, layer_norm=True, dtype=torch.bfloat16).eval()
    assert bf16(x.bfloat16()).dtype == torch.bfloat16
    assert len(answered) == 2, "bfloat16 (run in float): the Python forward"

    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            unbatched(dual)
    assert len(answered) == 2, "a tangent: the Python forward's error"


LAYER_MODULES = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "elman_tanh": rnnfast.RNN}


@pytest.mark.parametrize("kind", list(LAYER_MODULES))
@pytest.mark.parametrize("options,training", [
    (dict(layer_norm=True), True), (dict(layer_norm=True), False), (dict(zoneout=0.3), False),
    (dict(layer_norm=True, zoneout=0.4), False)], ids=str)
@pytest.mark.parametrize("layers,batch_first,hx_given,bias,proj_size", [
    (1, False, False, True, 0), (2, True, True, True, 0), (2, False, True, False, 0),
    (3, True, False, True, 2)])
def test_layers_in_cpp_equal_the_python_forward(kind, options, training, layers, batch_first,
                                                hx_given, bias, proj_size, monkeypatch):
    """A one-direction module with options that draw no masks (layer_norm, zoneout in
    evaluation) runs its stack in C++ (_C.options_layers): bit for bit the results and
    gradients (input, states and every parameter) of its Python forward, with torch.nn's
    dropout between layers drawn alike from the same seed."""
    lstm = kind == "lstm"
    proj_size = proj_size if lstm else 0  # (the GRU's and Elman's case: 3 layers, no projection)
    extra = dict(zoneout_cell=0.2) if lstm and "zoneout" in options else {}
    if proj_size:
        extra["proj_size"] = proj_size
    module = LAYER_MODULES[kind](5, 6, layers, bias=bias, batch_first=batch_first,
                                 dropout=0.25 if layers > 1 else 0.0, dtype=torch.float64,
                                 **options, **extra)
    module.train(training)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    batch, steps = (int(n) for n in torch.randint(1, 5, (2,)))
    x = torch.randn(*((batch, steps) if batch_first else (steps, batch)), 5,
                    dtype=torch.float64, requires_grad=True)
    state_size = proj_size or 6
    states = [torch.randn(layers, batch, size, dtype=torch.float64, requires_grad=True)
              for size in ((state_size, 6) if lstm else (state_size,))]
    hx = (tuple(states) if lstm else states[0]) if hx_given else None
    seed = int(torch.randint(0, 2**31, ()))
    results = {}
    for enabled in (True, False):
        with monkeypatch.context() as patch:
            answered = count_cpp_forward_calls(patch, enabled, "options_layers")
            torch.manual_seed(seed)
            output, state = module(x, hx)
        assert len(answered) == (1 if enabled else 0), f"options_layers answered {answered}"
        outputs = [output, *(state if lstm else [state])]
        leaves = [x, *states] if hx_given else [x]
        # (Drawn after the forward: alike only where both forwards drew the same numbers.)
        weights = [torch.randn_like(o) for o in outputs]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)),
                                    [*leaves, *module.parameters()])
        results[enabled] = [o.detach() for o in outputs] + list(grads)
    for got, want in zip(results[True], results[False]):
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_layers_in_cpp_decline_what_python_handles(monkeypatch):
    """What the C++ stack of modules with options leaves to the Python forward: masks to draw
    (zoneout, recurrent and input dropout in training), bidirectional, packed or unbatched
    input, bfloat16, a gain that a parametrization computes, a forward-mode AD tangent. Each
    gives the Python forward's results or error. Options that do not act in evaluation (the
    dropouts) leave torch.nn's layer, which the plain C++ stack runs."""
    torch.manual_seed(0)
    answered = count_cpp_forward_calls(monkeypatch, True, "options_layers")
    x = torch.randn(4, 3, 5)
    for options in (dict(zoneout=0.3), dict(layer_norm=True, recurrent_dropout=0.2),
                    dict(layer_norm=True, input_dropout=0.2)):
        module = rnnfast.GRU(5, 6, **options).train()
        torch.manual_seed(1)
        output = module(x)[0]
        torch.manual_seed(1)
        assert torch.equal(module(x)[0], output), "seeded: the same masks"
        assert answered == [], f"{options} in training draw masks: the Python forward"

    bidirectional = rnnfast.LSTM(5, 6, bidirectional=True, layer_norm=True).eval()
    assert bidirectional(x)[0].shape == (4, 3, 12)
    packed = pack_padded_sequence(x, [4, 3, 2])
    unpacked = pad_packed_sequence(rnnfast.LSTM(5, 6, layer_norm=True)(packed)[0])[0]
    assert unpacked.shape == (4, 3, 6)
    assert answered == [], "bidirectional and packed input: the Python forward"

    module = rnnfast.LSTM(5, 6, 2, layer_norm=True).eval()
    batched = module(x)[0]
    assert answered == ["lstm"]
    torch.testing.assert_close(module(x[:, 0])[0], batched[:, 0], rtol=1e-6, atol=1e-6)
    assert answered == ["lstm"], "unbatched input: the Python forward"
    bf16 = rnnfast.GRU(5, 6, layer_norm=True, dtype=torch.bfloat16).eval()
    assert bf16(x.bfloat16())[0].dtype == torch.bfloat16
    assert answered == ["lstm"], "bfloat16 (run in float): the Python forward"
    torch.nn.utils.parametrize.register_parametrization(module, "layer_norm_hh_weight_l1",
                                                        _Double())
    doubled = module(x)[0]
    assert not torch.allclose(doubled, batched), "the parametrized gain must be used"
    assert answered == ["lstm"], "a parametrized gain: the Python forward"
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            rnnfast.GRU(5, 6, layer_norm=True)(dual)
    assert answered == ["lstm"], "a tangent: the Python forward's error"

    plain_answered = count_cpp_forward_calls(monkeypatch, True, "plain_layers")
    dropouts = rnnfast.LSTM(5, 6, recurrent_dropout=0.3, input_dropout=0.3).eval()
    plain = rnnfast.LSTM(5, 6).eval()
    plain.load_state_dict(dropouts.state_dict())
    assert torch.equal(dropouts(x)[0], plain(x)[0])
    assert plain_answered == ["lstm", "lstm"], "the dropouts in evaluation: the plain stack"
