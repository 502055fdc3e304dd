"""Evaluations, one subpackage each, none importing another: `fid` (FID/KID and the checkpoint sweep),
`segment` (zero-shot lung segmentation by DiffSeg), `classify` (downstream classifiers with synthetic data)
and `audit` (privacy audit). Each writes a results record (`dinodiff.results`) that `dinodiff.report` reads
(`results.json`), so the report never imports evaluation code."""
