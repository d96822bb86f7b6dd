"""Weights and their compact storage, shared by the weight-compression passes
(``prune-magnitude``, ``share-weights``), ``materialize`` and ``fold-constants``.

Compressed layers are stored as small constants plus ordinary ONNX ops that stock
onnxruntime folds into plain weights once, when it creates the session; the graph it
runs, and so the inference speed, are the original's.

Modules, one concern each:

``sites``
    where the weight operands of Conv/ConvTranspose/Gemm/MatMul are, their values and
    storage, and which of them a pass selects.
``decode``
    decoder cones (the ops that expand a storage) and a numpy interpreter of them.
``storage_plan``
    the storage forms, the cheapest form of a layer, bit packing and gap coding.
``writer``
    writes new weight values into a model, one storage block per form.
``report``
    the compression report: bytes per layer and for the whole file.
``compression_pass``
    the option block and the find → select → decide → write → report run that the
    compression passes share.
"""
