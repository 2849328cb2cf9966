/* Symbols ggml-quants.c references but the K-quant reference quantizers never call: enough
   to build it alone as a shared library, the oracle of tests/export/test_kquants.py. */
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(int type, int64_t ne) { (void)type; (void)ne; return 0; }
const char * ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; return 0; }
