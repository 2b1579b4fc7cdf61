"""Load a saved folder (or Hub repo) with plain transformers, in a process where hf_freeze cannot be imported.

Usage: python plain_transformers_load.py FOLDER_OR_REPO INPUTS.pt OUT.pt
INPUTS.pt holds ``pixel_values`` and ``image`` (a uint8 HxWx3 array); OUT.pt gets the logits of
AutoModelForImageClassification(trust_remote_code=True), the pipeline's scores and the refusals without it.
"""

import sys

import torch
from PIL import Image

try:
    import hf_freeze  # noqa: F401
except ImportError as e:
    blocked = str(e)
else:
    sys.exit("hf_freeze is importable here; this script must run without it")

from transformers import AutoModelForImageClassification, pipeline  # noqa: E402

source, inputs_file, out_file = sys.argv[1:4]
inputs = torch.load(inputs_file)
model = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(pixel_values=inputs["pixel_values"]).logits
pipe = pipeline("image-classification", model=source, trust_remote_code=True)
scores = pipe(Image.fromarray(inputs["image"].numpy()), top_k=None, function_to_apply="softmax")
refusals = {}
for trust in (None, False):
    try:
        AutoModelForImageClassification.from_pretrained(source, **({} if trust is None else {"trust_remote_code": trust}))
        refusals[str(trust)] = "loaded"
    except Exception as e:  # what transformers says
        refusals[str(trust)] = f"{type(e).__name__}: {e}"
torch.save({"logits": logits, "scores": {s["label"]: s["score"] for s in scores}, "refusals": refusals,
            "model_class": type(model).__name__, "pipe_model_class": type(pipe.model).__name__, "blocked": blocked,
            "hf_freeze_modules": sorted(m for m in sys.modules if m.startswith("hf_freeze"))}, out_file)
