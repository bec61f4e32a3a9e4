"""The measures `landscape measure`, compare, track and correlate take: each one record in one module.

A measure is a `Measure` (registry.py): its name, the estimator it runs on an Objective, its result type,
its table rows, its scalar quantities and the checks its options need. The command line's flags and help
(options.py), the table `measure` prints, the quantities compare and correlate rank, and the revival of
stored results are all read from the registry. Adding a measure is one module and one `register` line
(docs/how-to/add-a-measure.md).
"""
