"""The train stage: heads over cached features only (never an encoder).

Three registries are the extension points (``module:attr`` strings, resolved lazily):

``HEADS`` (``HEAD=`` / ``--head``, default ``cam``)
    A head is a ``torch.nn.Module`` built as ``Head(dims, n_labels, options)``:

    * ``dims``: ``{stream name: feature width}`` for every tensor stream present in
      this run (e.g. ``{"sent_word": 384, "cap_word": 384, "img_vec": 1280}``);
      a stream that is absent is not in ``dims`` and not in the batch.
    * ``n_labels``: the size of the label set (labels[0] is the negative label).
    * ``options``: the ``[train]`` section of the profile merged with ``--opt k=v``.

    ``forward(batch) -> dict`` returns at least ``logits`` and, when the batch has
    ``label``, ``loss`` (the training objective) plus optional named scalar terms
    under ``aux`` (``{"ce": ..., "nce": ...}``) that the trainer logs.
    ``predict(batch) -> Tensor`` returns label ids (``[B]`` for RE).
    Optional class attributes:

    * ``dataset = "re"``: the ``DATASETS`` entry that builds its batches (default:
      the task's ``kind``);
    * ``metrics = "module:function"``: ``f(gold, pred, labels) -> dict`` of fractions
      with at least ``f1`` (the selection criterion); default :func:`metrics.re_metrics`
      (Acc over all samples, micro P/R/F1 over every label except ``labels[0]``).

``DATASETS`` (by task kind)
    ``build(settings, mllm, inputs) -> TrainData`` (see :mod:`stages.train.data`): features of
    every split, preloaded once into contiguous tensors, and ``batch(split, idx)``.  ``inputs``
    holds the resolved upstream outputs of one caption source (``data``, ``captions``,
    ``text_features``, ``image_streams``, ``umre_objects``): the application's graph runs the
    upstream stages, a dataset builder never does.

``STREAMS`` (optional per-record tensor streams; the visual side plugs in here)
    Each entry is ``provider(settings, records, inputs) -> dict[str, Tensor] | None`` where
    ``records`` is the list of record dicts of the data stage (all splits, in
    manifest order) and every returned tensor has first dimension ``len(records)``.
    Return ``None`` when the stream's cache is not there (the run then simply has no
    such modality).  Names the CAM head understands (RE batch format):

    ============== ============ ==============================================
    name           shape        meaning
    ============== ============ ==============================================
    img_vec        [N, Di]      global image feature (F_I)
    has_img        [N] bool     the sample has an image feature
    obj_vec        [N, 3, Di]   up to 3 object-crop features
    obj_mask       [N, 3] bool  which crops exist (fewer than 3: masked, never
                                silently zero-filled)
    trans_vec      [N, Di]      translation (generated) image feature (F_T)
    has_trans      [N] bool
    trans_obj_vec  [N, 3, Di]   objects of the generated image
    trans_obj_mask [N, 3] bool
    ============== ============ ==============================================

    A ``has_*``/``*_mask`` tensor is required with its stream.  Register with
    ``STREAMS.add("image", "stages.features.visual:train_streams")``.

The RE batch (built by :mod:`stages.train.data` from the records manifest, the
captions cache and the ``text_features`` cache; ``B`` samples, ``L``/``Lc`` the
longest sentence/caption in the batch in word pieces):

=============  ============  =====================================================
sent_word      [B, L, D]     sentence word-piece states (CLS/SEP and markers included)
sent_mask      [B, L] bool   real pieces
sent_vec       [B, D]        masked mean of the sentence (T_s)
h_idx, t_idx   [B] long      piece index of the head/tail start marker (or first piece)
h_end, t_end   [B] long      piece index of the head/tail end marker (or last piece)
cap_word       [B, Lc, D]    caption word-piece states (C_W); all-masked without caption
cap_mask       [B, Lc] bool
cap_vec        [B, D]        caption mean (C_s); zeros without caption
has_cap        [B] bool
label          [B] long      label id (labels[0] = ``None``)
index          [B] long      row of the sample in the records manifest
+ any STREAMS tensors, indexed per sample
=============  ============  =====================================================
"""

from __future__ import annotations

from pipeline.stage import Registry

HEADS = Registry("head")
HEADS.add("cam", "stages.train.cam:CamHead")
HEADS.add("remote", "stages.train.remote:RemoteHead")
HEADS.add("vecmner", "stages.train.vecmner:VecMnerHead")

DATASETS = Registry("train dataset")
DATASETS.add("re", "stages.train.data:build_re_data")
DATASETS.add("ner", "stages.train.ner:build_ner_data")
DATASETS.add("umre", "stages.train.umre:build_umre_data")

STREAMS = Registry("feature stream")
STREAMS.add("image", "stages.features.visual:train_streams")

DEFAULT_METRICS = "stages.train.metrics:re_metrics"
