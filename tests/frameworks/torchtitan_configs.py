"""A torchtitan ``--module`` for the tests: torchtitan's registry configs with a distclip section,
exactly as a user's config module would be (see docs/guides/torchtitan.md)."""

from torchtitan.models.llama3.config_registry import llama3_debugmodel

from distclip.integrations.torchtitan import DistclipTrainer, with_distclip


def llama3_debugmodel_distclip() -> DistclipTrainer.Config:
    return with_distclip(llama3_debugmodel())
