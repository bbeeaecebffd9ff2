"""Start-up of the commands that score images (issue 16): ``import_timm`` freezes what the import built and
leaves ``torch._dynamo`` for later, without changing what any model computes or what torch.compile does.

Each check runs in a fresh interpreter: the test process itself imported timm long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_fresh(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_timm_is_imported_with_its_objects_frozen() -> None:
    """Neither later collections nor the interpreter's exit traverse the import's objects again, and the
    collector is left on."""
    out = run_fresh("import gc, json; from dermcam.models.timm_import import import_timm; import_timm(); "
                    "print(json.dumps([gc.get_freeze_count(), gc.isenabled()]))")
    assert out[0] > 100_000 and out[1] is True


# Builds a tiny naflexvit (the timm family whose methods torch.compiler.disable decorates at import), runs
# it eagerly, then checks that the real torch._dynamo arrives on demand and that torch.compile still works.
NAFLEX_PROBE = """
import json, sys, torch
from dermcam.models.timm_import import import_timm, _Placeholder
timm = import_timm()
out = {"dynamo_after_import": "torch._dynamo" in sys.modules}
out["placeholders_left"] = any(isinstance(m, _Placeholder) for m in sys.modules.values()) or \\
    isinstance(torch.__dict__.get("_dynamo"), _Placeholder)
torch.manual_seed(0)
model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                          num_classes=3).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    eager = model(x)
out["eager"] = eager.tolist()
roi = sys.modules["torchvision.ops.roi_align"]
out["roi_compile_supported"] = roi.is_compile_supported("cpu")
import torch._dynamo
from torch._dynamo.utils import is_compile_supported
out["roi_matches_real"] = roi.is_compile_supported("cpu") == is_compile_supported("cpu")
out["real_dynamo"] = hasattr(torch._dynamo, "config") and not isinstance(torch._dynamo, _Placeholder)
with torch.no_grad():
    out["compiled_matches"] = torch.allclose(torch.compile(model, backend="eager")(x), eager, atol=1e-6)
print(json.dumps(out))
"""


def test_dynamo_is_left_for_later_and_arrives_on_demand() -> None:
    out = run_fresh(NAFLEX_PROBE)
    assert out["dynamo_after_import"] is False  # the ~1 s it costs is not paid by explain or evaluate
    assert out["placeholders_left"] is False
    assert out["real_dynamo"] is True and out["roi_matches_real"] is True
    assert out["compiled_matches"] is True


def test_deferral_changes_no_output() -> None:
    """The same model gives the same numbers with the deferral and with it turned off."""
    deferred = run_fresh(NAFLEX_PROBE)
    eager = run_fresh(NAFLEX_PROBE, DERMCAM_EAGER_DYNAMO="1")
    assert eager["dynamo_after_import"] is True  # the switch does turn it off
    assert deferred["eager"] == eager["eager"]


@pytest.mark.parametrize("attribute", ["config", "is_compiling"])
def test_anything_else_asked_of_the_placeholder_imports_the_real_module(attribute: str) -> None:
    """A newer timm or torchvision that needs more of dynamo while it loads gets the real thing."""
    out = run_fresh(f"""
import json, sys, torch
from dermcam.models import timm_import
with timm_import._dynamo_deferred():
    import torch._dynamo
    value = getattr(torch._dynamo, "{attribute}")
    inside = "torch._dynamo" in sys.modules and not isinstance(sys.modules["torch._dynamo"], timm_import._Placeholder)
import torch._dynamo as after
print(json.dumps([inside, getattr(after, "{attribute}") is value]))
""")
    assert out == [True, True]


def test_a_function_disabled_during_the_import_is_disabled_when_first_called() -> None:
    """``torch.compiler.disable`` used while the placeholder is in place (timm's naflexvit does it at
    import): the function computes the same, eagerly and inside torch.compile, and the real
    ``torch._dynamo.disable`` is applied at its first call."""
    out = run_fresh("""
import json, sys, torch
from dermcam.models import timm_import
with timm_import._dynamo_deferred():
    @torch.compiler.disable
    def double(x):
        return x * 2
    @torch.compiler.disable(recursive=False)
    def triple(x):
        return x * 3
before = "torch._dynamo" in sys.modules
eager = [double(torch.ones(2)).tolist(), triple(torch.ones(2)).tolist()]
loaded = "torch._dynamo" in sys.modules
compiled = torch.compile(lambda x: double(x) + triple(x), backend="eager")(torch.ones(2)).tolist()
print(json.dumps([before, eager, loaded, compiled]))
""")
    assert out == [False, [[2.0, 2.0], [3.0, 3.0]], True, [5.0, 5.0]]
