"""Graph passes: normalize an exported CNN, find its Conv+ReLU sites, rewrite them.

normalize is an onnx_ir PassManager of in-place passes (normalize.normalize_ir: each pass names
itself in its errors and checks what it ensures); FindSitesPass (sites.py) is an analysis pass on
the same IR model, which needs the names NameNodesPass gives (naming.py, shared with profile);
rewrite.rewrite plans each site (config + the rule's check), calibrates it (the rule's only
inference, memoized per site and setting) and runs RewritePass on the same IR model, which is
serialized once at the end. The public functions keep their signatures: normalize(model) ->
(model, modified), find_sites(model), rewrite(model, ...) -> (model, report).

Import from the submodules, e.g. `from onnxzero.passes.normalize import normalize`; this package
imports nothing itself so that `import onnxzero.passes.x` stays cheap.
"""
