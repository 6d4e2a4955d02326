// Scattered rows of a matrix in a file, read with pread(2) in one call from Python: a
// decode step reads a few dozen rows this way (its tokens' embeddings, the output
// projection's exact candidates), and a Python loop of os.preadv cost ~2.6 us a row.
// Why pread and not the memory map: see RowReader (realm/models/gguf_file.py).

#include <ATen/ATen.h>
#include <torch/library.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

namespace {

at::Tensor read_rows(int64_t fd, int64_t offset, int64_t row_bytes, int64_t n_rows, const at::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "read_rows: ids must be int64 (n,)");
  TORCH_CHECK(row_bytes > 0 && offset >= 0, "read_rows: a row must have bytes");
  const at::Tensor index = ids.contiguous();
  const int64_t* id = index.data_ptr<int64_t>();
  at::Tensor out = at::empty({index.size(0), row_bytes}, at::kByte);
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < index.size(0); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < n_rows, "read_rows: row ", id[i], " outside 0..", n_rows - 1);
    for (int64_t done = 0; done < row_bytes;) {
      const ssize_t got = pread(static_cast<int>(fd), dst + i * row_bytes + done, row_bytes - done,
                                offset + id[i] * row_bytes + done);
      if (got < 0 && errno == EINTR) continue;
      TORCH_CHECK(got > 0, "read_rows: the model file is shorter than it was when it was loaded");
      done += got;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(realm, m) {
  m.def("read_rows(int fd, int offset, int row_bytes, int n_rows, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(realm, CPU, m) { m.impl("read_rows", read_rows); }
