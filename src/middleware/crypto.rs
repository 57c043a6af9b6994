//! Encryption at rest (being written).
