"""bitsandbytes' import-time notice about its optional CPU kernel stays out of every command's output, and only
that notice."""

from __future__ import annotations

import logging


def test_only_the_kernel_notice_of_bitsandbytes_is_hidden(caplog):
    """The filter phi3v installs drops that one import-time message (bitsandbytes' wording, 0.50) and no other."""
    import phi3v  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("Failed to load CPU 4-bit kernels: libbitsandbytes_cpu.so not found")
    assert [record.getMessage() for record in caplog.records] == [
        "Failed to load CPU 4-bit kernels: libbitsandbytes_cpu.so not found"]
