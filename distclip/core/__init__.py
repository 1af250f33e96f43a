"""The layout-free core: config, names, groups, norms, the one collective, policies, the clipper, reports.

Data flows one way: an adapter (``distclip.adapters``) hands the core the pieces this rank counts;
the core computes per-group partial norms, reduces them in ONE collective, asks the policy for
thresholds, and hands the coefficients back to the adapter to apply.
"""
