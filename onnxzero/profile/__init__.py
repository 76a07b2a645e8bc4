"""Profile a CNN: where the time and the multiplications go, and how much of it ReLU throws away.

    from onnxzero.profile import profile_model
    report = profile_model("zoo:lenet5", runs=10)
    report.render(rich.console.Console())
    json.dumps(report.to_json())
    report.write_plots(Path("plots"))

See report.py for the units and the JSON layout, cost.py for how MACs and
parameters are counted, prepare.py for what is done to the model first.
"""

from onnxzero.profile.api import profile_model
from onnxzero.profile.report import ActivationProfile, ModelSummary, NodeProfile, ProfileReport, SiteProfile

__all__ = ["ActivationProfile", "ModelSummary", "NodeProfile", "ProfileReport", "SiteProfile", "profile_model"]
