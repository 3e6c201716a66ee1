"""The sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Each image-text pair of a batch is its own binary classification: with x, y the L2-normalized image and text
embeddings, the logits are z_ij = t * <x_i, y_j> + b, t = exp(t'), and the labels are +1 for a matching pair (the
diagonal) and -1 for every other one. The loss is

    L = -(1/n) * sum_ij log sigmoid(label_ij * z_ij)

summed over all n^2 pairs and divided by the number of images (as big_vision and transformers do). There is no
softmax over the batch, so no row or column needs the whole batch at once. log sigmoid is computed as
-softplus(-x), which never takes the exp of a large logit: |z| = 1e4 gives a finite loss and gradient.

t' and b are learned, initialised to t' = log 10 and b = -10 (the paper: the large negative bias offsets the
n^2 - n negatives at the start, so the first steps are not spent learning that most pairs do not match).

Batches split across devices (the paper's "chunked" form, `chunked_sigmoid_loss`): device d holds images I_d and
texts T_d. Each device first computes the loss of its own block (I_d vs T_d, the only block with positives), then
passes its texts to its neighbour and computes the all-negative block of its images against the texts it received,
D - 1 times round the ring. The blocks' sums add to the full sum, each device holds only a |I_d| x |T_d| block of
logits at a time, and the only traffic is the texts' embeddings. Here the ring is a loop over chunks on one device:
the same arithmetic, tested equal to the one-matrix loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INIT_LOGIT_SCALE = math.log(10.0)  # t' (t = exp(t') = 10)
INIT_LOGIT_BIAS = -10.0


def pair_labels(rows: int, columns: int, device=None) -> torch.Tensor:
    """+1 on the diagonal (image i matches text i), -1 elsewhere."""
    return 2 * torch.eye(rows, columns, device=device) - 1


def sigmoid_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """The sigmoid loss of a batch of n image-text pairs whose matching pairs lie on the diagonal.

    logits_per_image [n, n] (images x texts), with the scale and bias already applied. Returns a scalar.
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"sigmoid_loss takes square logits [n, n] (image i matches text i), got shape "
                         f"{tuple(logits_per_image.shape)}")
    n = logits_per_image.shape[0]
    labels = pair_labels(n, n, device=logits_per_image.device).to(logits_per_image.dtype)
    return -F.logsigmoid(labels * logits_per_image).sum() / n


def chunked_sigmoid_loss(image_chunks: list[torch.Tensor], text_chunks: list[torch.Tensor], logit_scale: torch.Tensor,
                         logit_bias: torch.Tensor) -> torch.Tensor:
    """The same loss, computed as the paper's ring of devices would: chunk d of images (normalized [n_d, C]) meets
    chunk d of texts (its positives on the diagonal), then the other chunks of texts, one at a time (all
    negatives). Equal to `sigmoid_loss` of the full logits; no [n, n] matrix is ever built."""
    if len(image_chunks) != len(text_chunks) or not image_chunks:
        raise ValueError(f"one chunk of texts per chunk of images: got {len(image_chunks)} and {len(text_chunks)}")
    if any(i.shape[0] != t.shape[0] for i, t in zip(image_chunks, text_chunks)):
        raise ValueError("chunk d of images and chunk d of texts must hold the same pairs (the same number of rows)")
    devices = len(image_chunks)
    scale = logit_scale.exp()
    total = 0.0
    for d, images in enumerate(image_chunks):
        for step in range(devices):  # step 0: the device's own texts; then those passed round the ring
            texts = text_chunks[(d + step) % devices]
            logits = scale * images @ texts.T + logit_bias
            if step == 0:
                labels = pair_labels(*logits.shape, device=logits.device).to(logits.dtype)
            else:
                labels = -torch.ones_like(logits)
            total = total + -F.logsigmoid(labels * logits).sum()
    return total / sum(chunk.shape[0] for chunk in image_chunks)
