"""The CRF (pytorch-crf) against brute-force enumeration, and seqeval entity metrics."""

import itertools

import pytest
import torch

from stages.data.twitter import TAGS
from stages.train.ner import SHAPES, WordCRF, ner_metrics, word_shape


def brute(crf, em, tags_len):
    """log Z and the best path by enumerating every tag sequence."""
    c = crf.crf
    K = em.shape[-1]
    scores = {}
    for path in itertools.product(range(K), repeat=tags_len):
        s = c.start_transitions[path[0]] + em[0, path[0]]
        for i in range(1, tags_len):
            s = s + c.transitions[path[i - 1], path[i]] + em[i, path[i]]
        s = s + c.end_transitions[path[-1]]
        scores[path] = s
    allv = torch.stack(list(scores.values()))
    return torch.logsumexp(allv, 0), max(scores, key=lambda p: float(scores[p].detach())), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crf_nll_and_viterbi_match_enumeration(seed):
    torch.manual_seed(seed)
    K, W = 3, 4
    crf = WordCRF(K)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    em = torch.randn(2, W, K, dtype=torch.float64).float()
    lens = [4, 2]
    mask = torch.arange(W)[None] < torch.tensor(lens)[:, None]
    tags = torch.randint(0, K, (2, W))
    nll = crf.nll(em, tags, mask)
    dec = crf.decode(em, mask)
    expect = []
    for b, n in enumerate(lens):
        logz, best, scores = brute(crf, em[b], n)
        expect.append(logz - scores[tuple(tags[b, :n].tolist())])
        assert dec[b, :n].tolist() == list(best)
        assert (dec[b, n:] == -1).all()
    assert torch.allclose(nll, torch.stack(expect).mean(), atol=1e-4)


def test_crf_ignores_padding_labels():
    crf = WordCRF(3)
    em = torch.randn(1, 3, 3)
    mask = torch.tensor([[True, True, False]])
    a = crf.nll(em, torch.tensor([[1, 2, 0]]), mask)
    b = crf.nll(em, torch.tensor([[1, 2, -100]]), mask)
    assert torch.allclose(a, b)


def ids(*seqs):
    return [[TAGS.index(t) for t in s.split()] for s in seqs]


def test_ner_metrics_conlleval_mode():
    gold = ids("B-PER I-PER O B-LOC", "O I-ORG I-ORG O")
    # the orphan I-ORG chunk is an entity (conlleval); one PER right, LOC missed, ORG right
    pred = ids("B-PER I-PER O O", "O I-ORG I-ORG O")
    m = ner_metrics(gold, pred, list(TAGS))
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    assert m["per_type"]["LOC"]["recall"] == 0.0 and m["per_type"]["PER"]["f1"] == 1.0
    assert m["support"] == 3
    # a boundary error is a miss and a false alarm
    m2 = ner_metrics(ids("B-PER I-PER O"), ids("B-PER O O"), list(TAGS))
    assert m2["f1"] == 0.0
    with pytest.raises(ValueError):
        ner_metrics(ids("O O"), ids("O"), list(TAGS))


def test_word_shapes():
    got = [SHAPES[word_shape(w)] for w in ["obama", "Obama", "NBA", "iPhone", "2017", "!", "@user", "#tag", "http://t.co/x", "\xa0", "A"]]
    assert got == ["lower", "Title", "UPPER", "mixed", "digit", "punct", "@user", "#tag", "url", "other", "Title"]
