"""The layout-free core: the clip as four stages over the adapter contract, and what they need.

    contract  the adapter Protocol the core talks to (adapters implement it; the core imports none)
    measure   adapter partials -> ONE collective -> the reduced slot vector     (norms, kernels, reduce)
    decide    reduced vector + config + policy state -> coefficients, skip      (policies, rowwise)
    apply     the decision, through the adapter (scale, fold, zero, drop)       (attach: the optimizer hook)
    record    report, running counters, sinks, audit                             (report, counters, sinks, audit)
    clipper   set-up (config, groups, slot layout, the set-up check) and the four stages per clip

Data flows one way: an adapter (:mod:`distclip.adapters`) hands the core the pieces this rank
counts and applies what the core decides; nothing here knows a layout.
"""
