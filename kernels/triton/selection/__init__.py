"""Selection kernels: exact top-k of score rows, sampled thresholds, candidate lists, the
device-side redo of rows whose threshold missed, and the hidden ids of masked selections."""
