//! Power-loss and fault-injection tests through the file-system seam (to be written).
