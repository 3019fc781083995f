"""modeaudit's KID against torch-fidelity's own `kid_features_to_metric` on the same features.

    pip install --no-deps torch-fidelity tqdm && python benchmarks/check_kid_torch_fidelity.py

A check, not a test: torch-fidelity is not a dependency (its package import needs
torchvision; its KID module needs only numpy and torch, so it is loaded without the
package's __init__). Expected: with float64 features the two agree to ~1e-13 relative (summation order only)
(the same subsets, kernel and unbiased estimator); with float32 features they differ
in the 6th-7th digit, torch-fidelity's own float32 rounding (modeaudit sums in float64).
modeaudit's kid(real, fake) is torch-fidelity's with input1 = real, input2 = fake (the
first set's subset is drawn first from the shared RandomState).
"""
import sys, types, importlib.util
import torch, os
# The package's __init__ pulls in the feature extractors (torchvision); load its submodules without it.
_spec = importlib.util.find_spec("torch_fidelity")
pkg = types.ModuleType("torch_fidelity"); pkg.__path__ = [os.path.dirname(_spec.origin)]
sys.modules["torch_fidelity"] = pkg
utils = types.ModuleType("torch_fidelity.utils")
for n in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached", "resolve_feature_extractor",
          "resolve_feature_layer_for_metric"):
    setattr(utils, n, None)
sys.modules["torch_fidelity.utils"] = utils
try:
    from torch_fidelity.metric_kid import kid_features_to_metric
except ImportError as e:
    sys.exit(f"torch-fidelity's KID module does not import ({e}); pip install --no-deps torch-fidelity tqdm")
import numpy as np
from modeaudit.tasks.metrics.kid import kid
rng = np.random.default_rng(4)
for d, n1, n2, m, s in ((16, 500, 450, 200, 7), (2048, 1500, 1200, 1000, 5)):
    real = rng.standard_normal((n1, d)).astype(np.float32)
    fake = (rng.standard_normal((n2, d)) + 0.05).astype(np.float32)
    ours = kid(real, fake, subsets=s, subset_size=m, seed=2020)
    for dt in (torch.float32, torch.float64):
        tf = kid_features_to_metric(torch.tensor(real, dtype=dt), torch.tensor(fake, dtype=dt), kid_subsets=s,
                                    kid_subset_size=m, kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020,
                                    verbose=False)
        a, b = tf["kernel_inception_distance_mean"], tf["kernel_inception_distance_std"]
        print(f"d={d} m={m} subsets={s} torch-fidelity features {dt}: kid {a:.12g} std {b:.6g}; modeaudit kid "
              f"{ours['kid']:.12g} std {ours['kid_std']:.6g}; rel diff {abs(a-ours['kid'])/abs(a):.2e}")
