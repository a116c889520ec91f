"""mk explain: which words made a classifier decide.

`words` (tokens grouped into words, dataset rows back to text), `methods` (Captum's
integrated gradients, occlusion, Kernel SHAP and LIME; attention rollout), `explain`
(the command: inputs, checks, the deletion check, the per-class summary), `render`
(what the terminal and the page draw) and `page` (the self-contained HTML page).
"""
