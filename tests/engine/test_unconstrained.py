"""Population draws mapped into the sampler's unconstrained space (``engine.compile``): one call
over all draws gives, draw for draw, what each variable's own PyMC transform gives."""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest

from bayestwin.engine.compile import _forward


def _model():
    with pm.Model() as model:
        pm.HalfNormal("scale", 1.0, shape=3)  # log
        pm.Beta("p", 2.0, 3.0)  # logodds
        pm.Uniform("u", -1.0, 4.0, shape=2)  # interval
        pm.Dirichlet("w", a=np.ones(4))  # simplex
        pm.Normal("cuts", 0.0, 3.0, shape=3, transform=pm.distributions.transforms.ordered, initval=[-1.0, 0.0, 1.0])
        pm.LKJCholeskyCov("chol", n=3, eta=2.0, sd_dist=pm.Exponential.dist(1.0, shape=3), compute_corr=False)
    return model


@pytest.mark.parametrize("name", ["scale", "p", "u", "w", "cuts", "chol"])
def test_the_batched_transform_equals_the_transform_of_each_draw(name):
    model = _model()
    rv = model[name]
    x = np.asarray(pm.draw(rv, draws=40, random_seed=1))
    if name == "cuts":
        x = np.sort(x, axis=-1)  # in the transform's domain
    transform = model.rvs_to_transforms[rv]
    out = _forward(transform, rv, x)
    ref = np.stack([transform.forward(pt.as_tensor(xi), *rv.owner.inputs).eval() for xi in x])
    assert out.shape == ref.shape and len(out) == 40
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
