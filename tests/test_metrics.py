"""Metrics against scikit-learn and hand-computed values (independent references)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

from timm_rsmamba.metrics import (classification_metrics, confusion_matrix, drop_sampler_padding,
                                  format_per_class_table, gather_across_ranks, metrics_from_logits,
                                  save_confusion_matrix_png)

# 6 classes: class 4 is never predicted, class 5 never occurs in the targets
TARGETS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 1, 0]
PREDS = [0, 1, 0, 1, 1, 2, 3, 2, 0, 3, 5, 0, 2, 3, 1, 0]


@pytest.mark.parametrize('average', ['macro', 'weighted', 'micro'])
def test_averages_match_sklearn(average):
    m = classification_metrics(torch.tensor(PREDS), torch.tensor(TARGETS), num_classes=6, average=average)
    p, r, f, _ = precision_recall_fscore_support(TARGETS, PREDS, labels=list(range(6)), average=average,
                                                 zero_division=0)
    assert m['precision'] == pytest.approx(100 * p)
    assert m['recall'] == pytest.approx(100 * r)
    assert m['f1'] == pytest.approx(100 * f)
    assert m['top1'] == pytest.approx(100 * np.mean(np.array(TARGETS) == np.array(PREDS)))


def test_per_class_and_confusion_matrix_match_sklearn():
    m = classification_metrics(torch.tensor(PREDS), torch.tensor(TARGETS), num_classes=6)
    p, r, f, s = precision_recall_fscore_support(TARGETS, PREDS, labels=list(range(6)), zero_division=0)
    np.testing.assert_allclose(m['per_class']['precision'].numpy(), 100 * p)
    np.testing.assert_allclose(m['per_class']['recall'].numpy(), 100 * r)
    np.testing.assert_allclose(m['per_class']['f1'].numpy(), 100 * f)
    np.testing.assert_array_equal(m['per_class']['support'].numpy(), s)
    np.testing.assert_array_equal(m['confusion_matrix'].numpy(),
                                  sk_confusion_matrix(TARGETS, PREDS, labels=list(range(6))))
    assert float(m['per_class']['precision'][4]) == 0.  # never predicted
    assert float(m['per_class']['recall'][5]) == 0.  # never a target


def test_macro_by_hand():
    # 2 classes: preds [0, 0, 1], targets [0, 1, 1]: P = (1/2, 1), R = (1, 1/2), F1 = (2/3, 2/3)
    m = classification_metrics(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 2)
    assert m['precision'] == pytest.approx(75.)
    assert m['recall'] == pytest.approx(75.)
    assert m['f1'] == pytest.approx(100 * 2 / 3)


def test_metrics_from_logits_topk_vs_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g)
    targets = torch.randint(0, 7, (50,), generator=g)
    m = metrics_from_logits(logits, targets, topk=(1, 5))
    labels = list(range(7))
    assert m['top5'] == pytest.approx(100 * top_k_accuracy_score(targets.numpy(), logits.numpy(), k=5, labels=labels))
    assert m['top1'] == pytest.approx(100 * top_k_accuracy_score(targets.numpy(), logits.numpy(), k=1, labels=labels))
    # the train engine passes num_classes positionally
    m2 = metrics_from_logits(logits, targets, 7)
    assert m2['f1'] == pytest.approx(m['f1'])
    # top-5 with 3 classes is clipped to top-3 = 100 %
    assert metrics_from_logits(logits[:, :3], targets % 3)['top5'] == pytest.approx(100.)


def test_out_of_range_indices_are_reported():
    with pytest.raises(ValueError, match='out of range'):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)


def test_gather_without_process_group_is_identity_and_padding_dropped():
    t = torch.arange(5)
    assert torch.equal(gather_across_ranks(t), t)
    # OrderedDistributedSampler on 5 samples, 2 ranks: rank0 [0, 2, 4], rank1 [1, 3, 0(pad)]
    gathered = torch.tensor([0, 2, 4, 1, 3, 0])
    assert drop_sampler_padding(gathered, 5, 2).tolist() == [0, 1, 2, 3, 4]


def test_confusion_png_and_table(tmp_path):
    m = classification_metrics(torch.tensor(PREDS), torch.tensor(TARGETS), num_classes=6)
    names = [f'class_{i}' for i in range(6)]
    path = save_confusion_matrix_png(m['confusion_matrix'], names, tmp_path / 'cm.png')
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    table = format_per_class_table(m, names)
    assert 'class_5' in table and 'macro avg' in table
    assert len(table.splitlines()) == 6 + 5
