"""The reference engine: CrypTen's MPC tensors with CrypTen's TTP as the dealer (the only code that imports crypten)."""
