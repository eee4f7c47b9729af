// The target's functions are `static inline` in include/CEfficientAttention.h; SwiftPM
// needs one source file to build a C target.
#include "CEfficientAttention.h"
