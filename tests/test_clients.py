"""Real clients: the training loops of pytorch/examples' word_language_model and
time_sequence_prediction and of the pytorch/tutorials chatbot, run a few steps from the same
seed with torch.nn's recurrent layers and with rnnfast's (the model code takes the namespace the
layers come from, as `import rnnfast as rnn` would): the losses and the trained weights agree to
float64 rounding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast

DTYPE = torch.float64


# ---- word_language_model (pytorch/examples): model.py and main.py's train() -------------

class RNNModel(nn.Module):
    """word_language_model's RNNModel with an LSTM: encoder, dropout, recurrent layers with
    dropout between them, decoder."""

    def __init__(self, recurrent, ntoken, ninp, nhid, nlayers, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = recurrent.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    """Detaches hidden states from their history (main.py)."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def train_word_language_model(recurrent, corpus, steps, bptt=7, lr=5.0, clip=0.25):
    """main.py's train(): batches of bptt steps, hidden carried and detached between them,
    SGD by hand with clip_grad_norm_. Returns the losses and the final parameters."""
    torch.manual_seed(0)
    model = RNNModel(recurrent, ntoken=23, ninp=10, nhid=12, nlayers=2, dropout=0.2).to(DTYPE)
    model.train()
    criterion = nn.NLLLoss()
    hidden = model.init_hidden(corpus.size(1))
    losses = []
    for step in range(steps):
        start = step * bptt
        data, targets = corpus[start:start + bptt], corpus[start + 1:start + 1 + bptt].reshape(-1)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_word_language_model_training_matches_torch_nn():
    corpus = torch.randint(0, 23, (7 * 4 + 1, 5))
    expected_losses, expected_weights = train_word_language_model(nn, corpus, steps=4)
    losses, weights = train_word_language_model(rnnfast, corpus, steps=4)
    assert losses == pytest.approx(expected_losses, rel=1e-10, abs=0)
    for got, want in zip(weights, expected_weights, strict=True):
        torch.testing.assert_close(got, want)


# ---- chatbot (pytorch/tutorials): packed bidirectional GRU encoder, Luong attention GRU
# decoder, masked NLL loss, Adam with gradient clipping ------------------------------------

class EncoderRNN(nn.Module):
    def __init__(self, recurrent, hidden_size, embedding, n_layers, dropout):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = embedding
        self.gru = recurrent.GRU(hidden_size, hidden_size, n_layers,
                                 dropout=(0 if n_layers == 1 else dropout), bidirectional=True)

    def forward(self, input_seq, input_lengths, hidden=None):
        embedded = self.embedding(input_seq)
        packed = pack_padded_sequence(embedded, input_lengths)
        outputs, hidden = self.gru(packed, hidden)
        outputs, _ = pad_packed_sequence(outputs)
        outputs = outputs[:, :, :self.hidden_size] + outputs[:, :, self.hidden_size:]
        return outputs, hidden


class LuongAttnDecoderRNN(nn.Module):
    def __init__(self, recurrent, embedding, hidden_size, output_size, n_layers, dropout):
        super().__init__()
        self.n_layers = n_layers
        self.embedding = embedding
        self.embedding_dropout = nn.Dropout(dropout)
        self.gru = recurrent.GRU(hidden_size, hidden_size, n_layers,
                                 dropout=(0 if n_layers == 1 else dropout))
        self.concat = nn.Linear(hidden_size * 2, hidden_size)
        self.out = nn.Linear(hidden_size, output_size)

    def forward(self, input_step, last_hidden, encoder_outputs):
        embedded = self.embedding_dropout(self.embedding(input_step))
        rnn_output, hidden = self.gru(embedded, last_hidden)
        # "dot" attention
        attn_weights = F.softmax(torch.sum(rnn_output * encoder_outputs, dim=2).t(), dim=1)
        context = attn_weights.unsqueeze(1).bmm(encoder_outputs.transpose(0, 1))
        concat_output = torch.tanh(self.concat(torch.cat((rnn_output.squeeze(0),
                                                          context.squeeze(1)), 1)))
        return F.softmax(self.out(concat_output), dim=1), hidden


def mask_nll_loss(inp, target, mask):
    cross_entropy = -torch.log(torch.gather(inp, 1, target.view(-1, 1)).squeeze(1))
    return cross_entropy.masked_select(mask).mean()


def train_chatbot(recurrent, batches, vocabulary, hidden=10, layers=2, dropout=0.1):
    """The tutorial's train() with teacher forcing at every step; returns the losses."""
    torch.manual_seed(0)
    embedding = nn.Embedding(vocabulary, hidden)
    encoder = EncoderRNN(recurrent, hidden, embedding, layers, dropout).to(DTYPE)
    decoder = LuongAttnDecoderRNN(recurrent, embedding, hidden, vocabulary, layers,
                                  dropout).to(DTYPE)
    encoder.train()
    decoder.train()
    encoder_optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=5e-3)
    losses = []
    for input_variable, lengths, target_variable, mask in batches:
        encoder_optimizer.zero_grad()
        decoder_optimizer.zero_grad()
        encoder_outputs, encoder_hidden = encoder(input_variable, lengths)
        decoder_input = torch.ones(1, input_variable.size(1), dtype=torch.long)  # SOS
        decoder_hidden = encoder_hidden[:decoder.n_layers]
        loss = 0
        for t in range(target_variable.size(0)):
            decoder_output, decoder_hidden = decoder(decoder_input, decoder_hidden,
                                                     encoder_outputs)
            decoder_input = target_variable[t].view(1, -1)
            loss = loss + mask_nll_loss(decoder_output, target_variable[t], mask[t])
        loss.backward()
        nn.utils.clip_grad_norm_(encoder.parameters(), 50.0)
        nn.utils.clip_grad_norm_(decoder.parameters(), 50.0)
        encoder_optimizer.step()
        decoder_optimizer.step()
        losses.append(loss.item())
    return losses


def chatbot_batches(count, batch=5, vocabulary=19, max_length=8):
    """Padded sentence pairs as the tutorial's batch2TrainData gives them: inputs [T, B]
    sorted by decreasing length, targets [T', B] with a mask of their real tokens."""
    batches = []
    for _ in range(count):
        lengths = torch.sort(torch.randint(2, max_length + 1, (batch,)), descending=True).values
        lengths[0] = max_length
        inputs = torch.randint(3, vocabulary, (max_length, batch))
        inputs[torch.arange(max_length)[:, None] >= lengths] = 0  # PAD
        target_lengths = torch.randint(2, max_length + 1, (batch,))
        targets = torch.randint(3, vocabulary, (int(target_lengths.max()), batch))
        mask = torch.arange(targets.size(0))[:, None] < target_lengths
        batches.append((inputs, lengths, targets, mask))
    return batches


def test_chatbot_training_matches_torch_nn():
    batches = chatbot_batches(3)
    expected = train_chatbot(nn, batches, vocabulary=19)
    losses = train_chatbot(rnnfast, batches, vocabulary=19)
    assert losses == pytest.approx(expected, rel=1e-10, abs=0)


# ---- time_sequence_prediction (pytorch/examples): two LSTMCells stepped in Python over sine
# waves, float64, zero states given, LBFGS, then a prediction of future steps from its own
# output under no_grad ------------------------------------------------------------------------

class SinePredictor(nn.Module):
    """time_sequence_prediction's Sequence: LSTMCell(1, H), LSTMCell(H, H), Linear(H, 1), one
    step at a time; past the input, each step's prediction is the next step's input."""

    def __init__(self, recurrent, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.first = recurrent.LSTMCell(1, hidden_size)
        self.second = recurrent.LSTMCell(hidden_size, hidden_size)
        self.readout = nn.Linear(hidden_size, 1)

    def forward(self, waves, future=0):
        rows = waves.size(0)
        # explicit zero states, as the example makes them: states that need no gradient
        states = [torch.zeros(rows, self.hidden_size, dtype=DTYPE) for _ in range(4)]
        h1, c1, h2, c2 = states
        predictions = []
        for value in waves.split(1, dim=1):
            h1, c1 = self.first(value, (h1, c1))
            h2, c2 = self.second(h1, (h2, c2))
            predictions.append(self.readout(h2))
        for _ in range(future):
            h1, c1 = self.first(predictions[-1], (h1, c1))
            h2, c2 = self.second(h1, (h2, c2))
            predictions.append(self.readout(h2))
        return torch.cat(predictions, dim=1)


def sine_waves(rows, length, period=20):
    """Sine waves [rows, length] shifted by random phases, as the example's data."""
    shifts = torch.randint(-4 * period, 4 * period, (rows, 1))
    return torch.sin((torch.arange(length) + shifts).to(DTYPE) / period)


def train_sine_predictor(recurrent, waves, steps, future):
    """Each closure's loss over `steps` LBFGS steps, and the prediction of `future` steps
    after them."""
    torch.manual_seed(0)
    model = SinePredictor(recurrent, hidden_size=13).to(DTYPE)
    train, test = waves[2:], waves[:2]
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.8, max_iter=4)
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(train[:, :-1]), train[:, 1:])
        losses.append(loss.item())
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    with torch.no_grad():
        prediction = model(test[:, :-1], future=future)
    return losses, prediction


def test_time_sequence_prediction_training_matches_torch_nn():
    waves = sine_waves(rows=6, length=40)
    expected_losses, expected_prediction = train_sine_predictor(nn, waves, steps=2, future=10)
    losses, prediction = train_sine_predictor(rnnfast, waves, steps=2, future=10)
    assert len(losses) == len(expected_losses) > 2
    assert losses == pytest.approx(expected_losses, rel=1e-10, abs=0)
    torch.testing.assert_close(prediction, expected_prediction)
