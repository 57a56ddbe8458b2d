"""Testbeds made here from packaged weights: real-weight MoE models built from SmolLM2-135M
(:mod:`.build`, with the sparse routing of :mod:`.sparse`), the newcomer's demo (:mod:`.demo`)
and the managed vLLM server process it and the tests use (:mod:`.server`).

``python -m quantize_tools.testbed`` builds a testbed checkpoint (see ``--help``).
"""
