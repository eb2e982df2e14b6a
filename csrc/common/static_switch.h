// Turns a runtime flag into a compile-time constant for the body, so kernels carry no
// per-element branches on options (the pattern of causal-conv1d and flash-attention).
#pragma once

#define RA_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool CONST_NAME = true;       \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool CONST_NAME = false;      \
      return __VA_ARGS__();                   \
    }                                         \
  }()
