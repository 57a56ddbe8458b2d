"""Offline KBVQ-MoE quantizer (``kbvq-quantize``).

The method -- IDRE, VQ, BCOS, mixed widths, fine-tuning, the scalar baselines -- is in :mod:`.method`.
Around it is the tool: :mod:`.cli` (the command), :mod:`.options` (what a run can be asked, and the
compute it runs on), :mod:`.pipeline` (streams decoder layers through the method and writes the
checkpoint), :mod:`.run_folder` (the partial output folder, resume and moving the result into place),
:mod:`.shards` (reading the input checkpoint), :mod:`.calibration` (text, token windows and each layer's
captured inputs) and :mod:`.report` (``kbvq_report.json``). Evaluation lives in :mod:`.eval` and the
testbeds and demo in :mod:`.testbed`; the quantizer imports neither.
"""
