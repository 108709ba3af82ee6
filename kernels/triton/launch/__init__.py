"""One launcher per misa op, named for what it computes, plus the device-side value checks they
share. Each launcher is both the eager CUDA implementation and the body of the op's triton_op
(../register.py)."""
