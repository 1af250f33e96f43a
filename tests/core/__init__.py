"""The core, one process: config, groups, policies, kernels, reports, errors, the package's structure."""
