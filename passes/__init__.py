"""Graph passes that find DSA lightning indexers in ATen graphs and rewrite them into misa ops."""
