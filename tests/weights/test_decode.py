"""onnxopt.weights.decode: the numpy interpreter against onnxruntime, and storage_of."""

from __future__ import annotations

import numpy as np

from onnxopt.weights.decode import storage_of, tensor_value
from tests.helpers import parse


def test_evaluator_matches_onnxruntime_on_each_decoder_op():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g () => (float[8] y, int64[6] run2, int64[2, 3] un, float[8] y2)
        <uint8[1, 3] wd = {27, 200, 5}, uint8[2, 1] sl = {4, 0}, uint8 sr = {4},
         int64[2] shp = {-1, 1}, int64[1] st = {-6}, int64[1] en = {1000}, int64[1] ax = {0}, int64[1] one = {1},
         float[4] cb = {0.0, 0.5, -1.5, 2.0}, int64[1] n = {8}, int64[3, 1] at = {1, 4, 6}, int64 zero = {0},
         int64[2] two3 = {2, 3}, int64[3] neg = {-1, 0, 1}>
        {
            l = BitShift <direction = "LEFT"> (wd, sl)
            r = BitShift <direction = "RIGHT"> (l, sr)
            col = Reshape(r, shp)
            part = Slice(col, st, en, ax, one)
            idx = Cast <to = 7> (part)
            flat = Squeeze(idx, one)
            run = CumSum <exclusive = 1, reverse = 1> (flat, zero)
            a, b = Split <num_outputs = 2> (run)
            joined = Concat <axis = 0> (b, a)
            run2 = Add(joined, joined)
            pick3 = Gather(cb, neg)
            three = Identity(pick3)
            un = Reshape(run2, two3)
            z = ConstantOfShape(n)
            y = ScatterND(z, at, three)
            at1 = Squeeze(at, one)
            y2 = ScatterElements(z, at1, three)
        }
    """)
    from onnxopt.validate import make_session

    sess = make_session(model)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {})))
    for t in model.graph.outputs:
        got = tensor_value(t)
        assert got is not None, t.name
        assert got.dtype == ref[t.name].dtype and np.array_equal(got, ref[t.name]), (t.name, got, ref[t.name])
    assert storage_of(model.graph.outputs[0]) == "sparse-idx"  # a scatter of codebook values
    assert storage_of(model.graph.outputs[1]) == "computed"
