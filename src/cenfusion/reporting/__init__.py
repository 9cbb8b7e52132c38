"""What a run leaves for people to look at: plots, an HTML report and model summaries.

Nothing here is imported by ``import cenfusion``; matplotlib is imported inside the functions
that draw, and figures are rendered by Agg without pyplot, so no display is needed.
"""
