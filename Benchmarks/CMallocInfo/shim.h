// mallinfo2() (glibc >= 2.33) for the benchmark's heap measurement.
#ifndef C_MALLOC_INFO_SHIM_H
#define C_MALLOC_INFO_SHIM_H
#if defined(__linux__)
#include <malloc.h>
#endif
#endif
