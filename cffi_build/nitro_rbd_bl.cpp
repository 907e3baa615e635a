/*
 * nitro_rbd_bl.cpp: the few calls of librbd's C++ API nitro needs, behind
 * a C interface (nitro_rbd_bl.h). The only C++ in the extension.
 *
 * The image is opened through the C API (nitro_rbd.c); a C++ read needs
 * a librbd::Image. Both are the same handle: librbd's rbd_open and
 * RBD::open each make one ImageCtx, and a librbd::Image is nothing but a
 * pointer to it (checked below at build time). So a read wraps the C
 * handle in an Image for the one call, and unwraps it before the Image's
 * destructor (which would close the image) runs. The pointer is a private
 * member: it is reached the one way the language allows, naming it in an
 * explicit template instantiation. That the two handles are the same
 * ImageCtx is librbd's code (librbd.cc), not a documented interface; the
 * build checks only that the Image is still one pointer. The clean way,
 * opening the image through the C++ API and moving every image call
 * nitro makes there, is not done.
 */
#include <cerrno>
#include <new>

#include <rbd/librbd.hpp>

#include "nitro_rbd_bl.h"

namespace {

template <typename Tag, typename Tag::type Member>
struct Expose {
    friend typename Tag::type member_of(Tag) { return Member; }
};

struct ImageCtx {
    typedef librbd::image_ctx_t librbd::Image::*type;
    friend type member_of(ImageCtx);
};

template struct Expose<ImageCtx, &librbd::Image::ctx>;

static_assert(sizeof(librbd::Image) == sizeof(librbd::image_ctx_t),
              "librbd::Image is a pointer to its ImageCtx, as rbd_image_t is");

/* A librbd::Image over a C handle, for the length of one call. */
class Borrowed {
public:
    explicit Borrowed(rbd_image_t image) { image_.*member_of(ImageCtx()) = image; }
    ~Borrowed() { image_.*member_of(ImageCtx()) = nullptr; }
    Borrowed(const Borrowed &) = delete;
    Borrowed &operator=(const Borrowed &) = delete;
    librbd::Image &get() { return image_; }

private:
    librbd::Image image_;
};

ceph::bufferlist *list(struct nitro_rbd_bl *bl)
{
    return reinterpret_cast<ceph::bufferlist *>(bl);
}

const ceph::bufferlist *list(const struct nitro_rbd_bl *bl)
{
    return reinterpret_cast<const ceph::bufferlist *>(bl);
}

}  // namespace

extern "C" struct nitro_rbd_bl *nitro_rbd_bl_new(void)
{
    return reinterpret_cast<struct nitro_rbd_bl *>(new (std::nothrow) ceph::bufferlist());
}

extern "C" void nitro_rbd_bl_free(struct nitro_rbd_bl *bl)
{
    delete list(bl);
}

extern "C" void nitro_rbd_bl_clear(struct nitro_rbd_bl *bl)
{
    list(bl)->clear();
}

/* librbd's C completions are its C++ ones (rbd_aio_create_completion makes
 * an RBD::AioCompletion, and librbd's own C read casts it back); a read
 * into a bufferlist has no C call. The list must be empty: the call's
 * trace and debug lines flatten (copy) a list that is not. librbd reports
 * failures through the completion; an exception (no memory) must not
 * cross into C, and can only come before librbd took the completion (its
 * one allocation before the hand-off is the request's), so the caller
 * releases the completion on an error return. */
extern "C" int nitro_rbd_aio_read_bl(rbd_image_t image, uint64_t off, uint64_t len,
                                     struct nitro_rbd_bl *bl, rbd_completion_t c)
{
    try {
        Borrowed img(image);
        return img.get().aio_read(off, len, *list(bl),
                                  static_cast<librbd::RBD::AioCompletion *>(c));
    } catch (const std::bad_alloc &) {
        return -ENOMEM;
    } catch (...) {
        return -EIO;
    }
}

extern "C" int nitro_rbd_bl_segments(const struct nitro_rbd_bl *bl, struct iovec *seg, int max)
{
    int n = 0;
    for (const auto &p : list(bl)->buffers()) {
        if (n < max) {
            seg[n].iov_base = const_cast<char *>(p.c_str());
            seg[n].iov_len = p.length();
        }
        n++;
    }
    return n;
}
