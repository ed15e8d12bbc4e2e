// Shared by the csrc/emu/harness*.cpp files (the C interface of the emulated kernels).
#pragma once
#include <cstdio>
#include <exception>

#include "../kernels/compat.cuh"

// Runs fn; returns 0, or 1 with the exception's message (an emulator fault) in err.
template <typename Fn>
int guarded(char* err, int err_len, Fn fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 1;
  }
}
