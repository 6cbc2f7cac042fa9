/*
 * stn_diffusers._speedups: an affine Gauss-Newton level and the identity comparison of
 * stn_diffusers.gauss_newton in C.
 *
 * The same arithmetic, up to float rounding, as gauss_newton.refine (its loop of
 * gauss_newton.gauss_newton_step) and gauss_newton.compare_with_identity, the PyTorch paths that
 * training and every other case use, for float32 maps on the CPU at inference. On 16x16 to 64x64
 * maps PyTorch spends most of a step dispatching some sixty small operations; here one call runs a
 * whole level. The module is an optional build: where no C compiler is found at install,
 * gauss_newton runs PyTorch alone.
 *
 * gauss_newton_refine(batch, channels, height, width, reference, grad_x, grad_y, weights, stacked,
 *                     theta, out, iterations, shear_free_steps, tolerance, robust, damping,
 *                     content_level, robust_scale) -> steps taken
 * compare_with_identity(batch, channels, height, width, reference, weights, stacked, theta,
 *                       answer_cost, identity_cost, share, content_level)
 *
 * Pointers are the addresses of contiguous float32 buffers (torch.Tensor.data_ptr()):
 *   reference, grad_x, grad_y  (B, D, N)   the linearised reference (N = height * width)
 *   weights                    (B, N)      the reference's cell weights
 *   stacked                    (B, D+1, N) the moving map and its content plane (gauss_newton.with_content)
 *   theta, out                 (B, 2, 3)   the start and the refined theta
 *   answer_cost, identity_cost, share  (B,)  compare_with_identity's three answers
 * Conventions (theta, cell centres, bilinear sampling with zero padding and align_corners=False,
 * replicated borders for gradients, the lower median) follow the PyTorch step exactly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The k-th smallest of values[0..count) (reordering them): the lower median for k = (count - 1) / 2,
   as torch.nanmedian returns it. */
static float kth_smallest(float *values, int count, int k) {
    int low = 0, high = count - 1;
    while (low < high) {
        float pivot = values[(low + high) / 2];
        int i = low, j = high;
        while (i <= j) {
            while (values[i] < pivot) i++;
            while (values[j] > pivot) j--;
            if (i <= j) {
                float swap = values[i];
                values[i] = values[j];
                values[j] = swap;
                i++;
                j--;
            }
        }
        if (k <= j)
            high = j;
        else if (k >= i)
            low = i;
        else
            return values[k];
    }
    return values[k];
}

/* Solves a (size x size) system in place (partial pivoting); the answer replaces rhs. */
static void solve(int size, double *matrix, double *rhs) {
    for (int k = 0; k < size; k++) {
        int pivot = k;
        for (int i = k + 1; i < size; i++)
            if (fabs(matrix[i * size + k]) > fabs(matrix[pivot * size + k])) pivot = i;
        if (pivot != k) {
            for (int j = 0; j < size; j++) {
                double swap = matrix[k * size + j];
                matrix[k * size + j] = matrix[pivot * size + j];
                matrix[pivot * size + j] = swap;
            }
            double swap = rhs[k];
            rhs[k] = rhs[pivot];
            rhs[pivot] = swap;
        }
        for (int i = k + 1; i < size; i++) {
            double factor = matrix[i * size + k] / matrix[k * size + k];
            for (int j = k; j < size; j++) matrix[i * size + j] -= factor * matrix[k * size + j];
            rhs[i] -= factor * rhs[k];
        }
    }
    for (int k = size - 1; k >= 0; k--) {
        double sum = rhs[k];
        for (int j = k + 1; j < size; j++) sum -= matrix[k * size + j] * rhs[j];
        rhs[k] = sum / matrix[k * size + k];
    }
}

/* Samples the moving map and its content plane (stacked, (D+1) x N) at theta's positions into warped
   (D x N): bilinear, zero padding, align_corners=False. A cell counts (weight = its reference weight)
   where it is covered and the sampled content is whole, else weight 0. A tap outside the map reads
   cell 0 with weight 0, so the channel loop has no branch. */
static void warp_counted(int channels, int height, int width, const float *stacked, const float *theta,
                         const float *reference_weights, double content_level, float *warped, float *weight) {
    const int cells = height * width;
    const float level = (float)content_level;
    /* A cell is covered when every pixel bilinear sampling reads lies inside the map: its sample
       within the outermost cell centres, with gauss_newton._coverage_limit's slack. */
    const float limit_x = (float)(1.0 - 1.0 / width + 1e-6), limit_y = (float)(1.0 - 1.0 / height + 1e-6);
    for (int i = 0; i < height; i++) {
        const float y = (float)((2.0 * i + 1) / height - 1);
        for (int j = 0; j < width; j++) {
            const float x = (float)((2.0 * j + 1) / width - 1);
            const float sx = theta[0] * x + theta[1] * y + theta[2];
            const float sy = theta[3] * x + theta[4] * y + theta[5];
            const float ix = ((sx + 1) * width - 1) * 0.5f, iy = ((sy + 1) * height - 1) * 0.5f;
            const float fx = floorf(ix), fy = floorf(iy);
            const int x0 = (int)fx, y0 = (int)fy;
            const float ax = ix - fx, ay = iy - fy;
            const float tap[4] = {(1 - ax) * (1 - ay), ax * (1 - ay), (1 - ax) * ay, ax * ay};
            const int tx[4] = {x0, x0 + 1, x0, x0 + 1}, ty[4] = {y0, y0, y0 + 1, y0 + 1};
            int offset[4];
            float share[4];
            for (int t = 0; t < 4; t++) {
                const int inside = tx[t] >= 0 && tx[t] < width && ty[t] >= 0 && ty[t] < height;
                offset[t] = inside ? ty[t] * width + tx[t] : 0;
                share[t] = inside ? tap[t] : 0.0f;
            }
            const int cell = i * width + j;
            for (int c = 0; c < channels; c++) {
                const float *plane = stacked + (size_t)c * cells;
                warped[(size_t)c * cells + cell] = share[0] * plane[offset[0]] + share[1] * plane[offset[1]] +
                                                   share[2] * plane[offset[2]] + share[3] * plane[offset[3]];
            }
            const float *plane = stacked + (size_t)channels * cells;
            const float content = share[0] * plane[offset[0]] + share[1] * plane[offset[1]] +
                                  share[2] * plane[offset[2]] + share[3] * plane[offset[3]];
            const int covered = fabsf(sx) <= limit_x && fabsf(sy) <= limit_y;
            weight[cell] = covered && content >= level ? reference_weights[cell] : 0.0f;
        }
    }
}

/* Sets each channel's mean and spread of warped (D x N) over the weighted cells to the reference's. */
static void match_statistics(int channels, int cells, float *warped, const float *reference, const float *weight) {
    double total = 0;
    for (int k = 0; k < cells; k++) total += weight[k];
    if (total < 1e-6) total = 1e-6;
    for (int c = 0; c < channels; c++) {
        float *restrict moving = warped + (size_t)c * cells;
        const float *restrict fixed = reference + (size_t)c * cells;
        /* One pass of weighted sums and sums of squares, in double: the variances are their
           differences, which double keeps exact enough for maps of order 1. */
        double moving_sum = 0, fixed_sum = 0, moving_squares = 0, fixed_squares = 0;
        for (int k = 0; k < cells; k++) {
            const double w = weight[k], m = moving[k], f = fixed[k];
            moving_sum += w * m;
            fixed_sum += w * f;
            moving_squares += w * m * m;
            fixed_squares += w * f * f;
        }
        const double moving_mean = moving_sum / total, fixed_mean = fixed_sum / total;
        const double moving_var = moving_squares / total - moving_mean * moving_mean;
        const double fixed_var = fixed_squares / total - fixed_mean * fixed_mean;
        const float gain = (float)(sqrt((fixed_var > 0 ? fixed_var : 0) + 1e-6) / sqrt((moving_var > 0 ? moving_var : 0) + 1e-6));
        const float offset = (float)(fixed_mean - moving_mean * gain);
        for (int k = 0; k < cells; k++) moving[k] = moving[k] * gain + offset;
    }
}

/* The mean over channels of the squared residual of each cell, (N). */
static void squared_residuals(int channels, int cells, const float *warped, const float *reference, float *out) {
    for (int k = 0; k < cells; k++) {
        double sum = 0;
        for (int c = 0; c < channels; c++) {
            const double r = warped[(size_t)c * cells + k] - reference[(size_t)c * cells + k];
            sum += r * r;
        }
        out[k] = (float)(sum / channels);
    }
}

/* The lower median of values[k] over the cells where counted[k] > 0 (NaN where none is), as
   torch.nanmedian gives it; kept (N) is a work buffer. */
static double counted_median(int cells, const float *values, const float *counted, float *kept) {
    int count = 0;
    for (int k = 0; k < cells; k++)
        if (counted[k] > 0) kept[count++] = values[k];
    return count ? kth_smallest(kept, count, (count - 1) / 2) : NAN;
}

/* One pair's step; warped (D*N), weight (N), scratch (N, and at least 2 * width + 2) and scratch2
   (5*N) are work buffers. */
static void step_one(int channels, int height, int width, const float *reference, const float *grad_x,
                     const float *grad_y, const float *reference_weights, const float *stacked, const float *theta,
                     float *out, int robust, int shear_free, double damping, double content_level,
                     double robust_scale, float *warped, float *weight, float *scratch, float *scratch2) {
    const int cells = height * width;
    /* 1. Warp the moving map and its content plane, and count the cells whose content is whole. */
    warp_counted(channels, height, width, stacked, theta, reference_weights, content_level, warped, weight);
    /* 2. Each channel's mean and spread over the counted cells set to the reference's. */
    match_statistics(channels, cells, warped, reference, weight);
    /* 3. Cauchy weights against the median squared residual of the counted cells. */
    if (robust) {
        squared_residuals(channels, cells, warped, reference, scratch);
        double typical = counted_median(cells, scratch, weight, scratch2);
        if (!(typical == typical)) typical = 1.0; /* no counted cell: NaN, as nan_to_num(1.0) */
        if (typical < 1e-8) typical = 1e-8;
        const double scale = robust_scale * robust_scale * typical;
        for (int k = 0; k < cells; k++) weight[k] = (float)(weight[k] / (1.0 + scratch[k] / scale));
    }
    /* 4. Per cell, summed over channels: both maps' gradient sums g, their products with each
       other and with the residual r (products: gx gx, gx gy, gy gy, gx r, gy r). Each row is read
       through a copy with its ends repeated (the replicated border), so the inner loops have no
       branch and vectorise. */
    float *restrict products = scratch2;
    float *restrict padded = scratch; /* width + 2 */
    memset(products, 0, sizeof(float) * 5 * (size_t)cells);
    const float half_width = width / 4.0f, half_height = height / 4.0f;
    for (int c = 0; c < channels; c++) {
        const float *map = warped + (size_t)c * cells;
        for (int i = 0; i < height; i++) {
            const size_t start = (size_t)i * width;
            const float *restrict row = map + start;
            const float *restrict above = map + (size_t)(i > 0 ? i - 1 : 0) * width;
            const float *restrict below = map + (size_t)(i < height - 1 ? i + 1 : height - 1) * width;
            const float *restrict fixed = reference + (size_t)c * cells + start;
            const float *restrict rx = grad_x + (size_t)c * cells + start;
            const float *restrict ry = grad_y + (size_t)c * cells + start;
            float *restrict xx = products + start, *restrict xy = products + cells + start;
            float *restrict yy = products + 2 * (size_t)cells + start, *restrict xr = products + 3 * (size_t)cells + start;
            float *restrict yr = products + 4 * (size_t)cells + start;
            memcpy(padded + 1, row, sizeof(float) * (size_t)width);
            padded[0] = row[0];
            padded[width + 1] = row[width - 1];
            for (int j = 0; j < width; j++) {
                const float gx = rx[j] + (padded[j + 2] - padded[j]) * half_width;
                const float gy = ry[j] + (below[j] - above[j]) * half_height;
                const float r = row[j] - fixed[j];
                xx[j] += gx * gx;
                xy[j] += gx * gy;
                yy[j] += gy * gy;
                xr[j] += gx * r;
                yr[j] += gy * r;
            }
        }
    }
    /* Their weighted moments against the cell coordinates, a row at a time: within a row y is
       fixed, so sums against 1, x and x^2 give every monomial x^a y^b of degree 2 or less. */
    float *restrict xs = scratch; /* the cells' x, then x^2 */
    float *restrict xs2 = scratch + width;
    for (int j = 0; j < width; j++) {
        xs[j] = (float)((2.0 * j + 1) / width - 1);
        xs2[j] = xs[j] * xs[j];
    }
    double moments[3][6] = {{0}}, drive[2][3] = {{0}};
    for (int i = 0; i < height; i++) {
        const double y = (2.0 * i + 1) / height - 1;
        const float *restrict w = weight + (size_t)i * width;
        double sums[5][3];
        for (int q = 0; q < 5; q++) {
            const float *restrict product = products + (size_t)q * cells + (size_t)i * width;
            float s0 = 0, s1 = 0, s2 = 0;
            for (int j = 0; j < width; j++) {
                const float v = w[j] * product[j];
                s0 += v;
                s1 += v * xs[j];
                s2 += v * xs2[j];
            }
            sums[q][0] = s0;
            sums[q][1] = s1;
            sums[q][2] = s2;
        }
        for (int q = 0; q < 3; q++) { /* monomials x^2, xy, x, y^2, y, 1 */
            moments[q][0] += sums[q][2];
            moments[q][1] += y * sums[q][1];
            moments[q][2] += sums[q][1];
            moments[q][3] += y * y * sums[q][0];
            moments[q][4] += y * sums[q][0];
            moments[q][5] += sums[q][0];
        }
        for (int q = 0; q < 2; q++) { /* [x, y, 1] */
            drive[q][0] += sums[3 + q][1];
            drive[q][1] += y * sums[3 + q][0];
            drive[q][2] += sums[3 + q][0];
        }
    }
    /* 5. The system for p (theta's step, row by row): the gradient sums' means carry 1/2 each. */
    static const int product[3][3] = {{0, 1, 2}, {1, 3, 4}, {2, 4, 5}}; /* [x, y, 1] x [x, y, 1] -> moment */
    double hessian[36], gradient[6], params[6];
    for (int a = 0; a < 3; a++) {
        for (int b = 0; b < 3; b++) {
            const int q = product[a][b];
            hessian[a * 6 + b] = moments[0][q] / 4;
            hessian[a * 6 + b + 3] = moments[1][q] / 4;
            hessian[(a + 3) * 6 + b] = moments[1][q] / 4;
            hessian[(a + 3) * 6 + b + 3] = moments[2][q] / 4;
        }
        gradient[a] = drive[0][a] / 2;
        gradient[a + 3] = drive[1][a] / 2;
    }
    if (shear_free) {
        /* Rotation, a scale per axis and a shift (gauss_newton.shear_free_basis). */
        const double aspect = (double)width / height;
        double basis[6][5] = {{0}};
        basis[0][0] = basis[4][1] = 1.0;
        basis[1][2] = -1.0 / aspect;
        basis[3][2] = aspect;
        basis[2][3] = basis[5][4] = 1.0;
        double reduced[25], rhs[5];
        for (int a = 0; a < 5; a++) {
            rhs[a] = 0;
            for (int i = 0; i < 6; i++) rhs[a] += basis[i][a] * gradient[i];
            for (int b = 0; b < 5; b++) {
                double sum = 0;
                for (int i = 0; i < 6; i++)
                    for (int j = 0; j < 6; j++) sum += basis[i][a] * hessian[i * 6 + j] * basis[j][b];
                reduced[a * 5 + b] = sum;
            }
        }
        for (int a = 0; a < 5; a++) reduced[a * 5 + a] = reduced[a * 5 + a] * (1 + damping) + 1e-8;
        solve(5, reduced, rhs);
        for (int i = 0; i < 6; i++) {
            params[i] = 0;
            for (int a = 0; a < 5; a++) params[i] += basis[i][a] * rhs[a];
        }
    } else {
        for (int a = 0; a < 6; a++) hessian[a * 6 + a] = hessian[a * 6 + a] * (1 + damping) + 1e-8;
        memcpy(params, gradient, sizeof params);
        solve(6, hessian, params);
    }
    /* 6. theta <- theta @ (I + P)^-1, the inverse of the affine step in closed form. */
    const double a = 1 + params[0], b = params[1], c = params[2], d = params[3], e = 1 + params[4], f = params[5];
    const double det = a * e - b * d;
    const double inverse[6] = {e / det, -b / det, (b * f - c * e) / det, -d / det, a / det, (c * d - a * f) / det};
    for (int row = 0; row < 2; row++) {
        const double t0 = theta[row * 3], t1 = theta[row * 3 + 1], t2 = theta[row * 3 + 2];
        out[row * 3 + 0] = (float)(t0 * inverse[0] + t1 * inverse[3]);
        out[row * 3 + 1] = (float)(t0 * inverse[1] + t1 * inverse[4]);
        out[row * 3 + 2] = (float)(t0 * inverse[2] + t1 * inverse[5] + t2);
    }
}

/* gauss_newton.compare_with_identity for one pair: the median cell residual of the answer (cells it
   leaves uncovered count the identity's residual) and of the identity, over the cells the identity
   counts, and the share of the reference's weight both cover. Work: warped (D*N), two weights (N),
   two residuals (N) and kept (N). */
static void compare_one(int channels, int height, int width, const float *reference, const float *reference_weights,
                        const float *stacked, const float *theta, double content_level, float *answer_cost,
                        float *identity_cost, float *share, float *warped, float *answer_weight,
                        float *identity_weight, float *answer_residual, float *identity_residual, float *kept) {
    const int cells = height * width;
    const float *content = stacked + (size_t)channels * cells;
    /* The identity samples every cell at its centre: the map itself, counted but over its padding. */
    for (int k = 0; k < cells; k++) identity_weight[k] = content[k] >= content_level ? reference_weights[k] : 0.0f;
    memcpy(warped, stacked, sizeof(float) * (size_t)channels * cells);
    match_statistics(channels, cells, warped, reference, identity_weight);
    squared_residuals(channels, cells, warped, reference, identity_residual);
    warp_counted(channels, height, width, stacked, theta, reference_weights, content_level, warped, answer_weight);
    match_statistics(channels, cells, warped, reference, answer_weight);
    squared_residuals(channels, cells, warped, reference, answer_residual);
    double seen = 0, total = 0;
    for (int k = 0; k < cells; k++) {
        const int both = identity_weight[k] > 0 && answer_weight[k] > 0;
        if (!both) answer_residual[k] = identity_residual[k];
        seen += both ? reference_weights[k] : 0.0;
        total += reference_weights[k];
    }
    *answer_cost = (float)counted_median(cells, answer_residual, identity_weight, kept);
    *identity_cost = (float)counted_median(cells, identity_residual, identity_weight, kept);
    *share = (float)(seen / (total > 1e-12 ? total : 1e-12));
}

static PyObject *compare_with_identity(PyObject *self, PyObject *args) {
    int batch, channels, height, width;
    unsigned long long reference, weights, stacked, theta, answer, identity, share;
    double content_level;
    if (!PyArg_ParseTuple(args, "iiiiKKKKKKKd", &batch, &channels, &height, &width, &reference, &weights, &stacked,
                          &theta, &answer, &identity, &share, &content_level))
        return NULL;
    if (batch < 1 || channels < 1 || height < 1 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "expected batch, channels, height and width >= 1");
        return NULL;
    }
    const size_t cells = (size_t)height * width;
    float *work = (float *)malloc(sizeof(float) * cells * (size_t)(channels + 5));
    if (work == NULL) return PyErr_NoMemory();
    float *warped = work, *rest = work + (size_t)channels * cells;
    Py_BEGIN_ALLOW_THREADS
    for (int n = 0; n < batch; n++)
        compare_one(channels, height, width, (const float *)(uintptr_t)reference + (size_t)n * channels * cells,
                    (const float *)(uintptr_t)weights + (size_t)n * cells,
                    (const float *)(uintptr_t)stacked + (size_t)n * (channels + 1) * cells,
                    (const float *)(uintptr_t)theta + (size_t)n * 6, content_level, (float *)(uintptr_t)answer + n,
                    (float *)(uintptr_t)identity + n, (float *)(uintptr_t)share + n, warped, rest, rest + cells,
                    rest + 2 * cells, rest + 3 * cells, rest + 4 * cells);
    Py_END_ALLOW_THREADS
    free(work);
    Py_RETURN_NONE;
}

static PyObject *gauss_newton_refine(PyObject *self, PyObject *args) {
    int batch, channels, height, width, iterations, shear_free_steps, robust;
    unsigned long long reference, grad_x, grad_y, weights, stacked, theta, out;
    double tolerance, damping, content_level, robust_scale;
    if (!PyArg_ParseTuple(args, "iiiiKKKKKKKiidpddd", &batch, &channels, &height, &width, &reference, &grad_x,
                          &grad_y, &weights, &stacked, &theta, &out, &iterations, &shear_free_steps, &tolerance,
                          &robust, &damping, &content_level, &robust_scale))
        return NULL;
    if (batch < 1 || channels < 1 || height < 1 || width < 1 || iterations < 0) {
        PyErr_SetString(PyExc_ValueError, "expected batch, channels, height and width >= 1 and iterations >= 0");
        return NULL;
    }
    const size_t cells = (size_t)height * width;
    /* warped (D*N), weight (N), products (5*N), scratch (N, and at least a row's 2 * width + 2), next theta. */
    const size_t scratch_size = cells > 2 * (size_t)width + 2 ? cells : 2 * (size_t)width + 2;
    float *work = (float *)malloc(sizeof(float) * (cells * (size_t)(channels + 6) + scratch_size + (size_t)batch * 6));
    if (work == NULL) return PyErr_NoMemory();
    float *weight = work + (size_t)channels * cells, *products = weight + cells, *scratch = products + 5 * cells;
    float *current = (float *)(uintptr_t)out, *next = scratch + scratch_size;
    memcpy(current, (const float *)(uintptr_t)theta, sizeof(float) * (size_t)batch * 6);
    int taken = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; taken < iterations;) {
        double moved = 0;
        for (int n = 0; n < batch; n++) {
            const size_t map = (size_t)n * channels * cells;
            step_one(channels, height, width, (const float *)(uintptr_t)reference + map,
                     (const float *)(uintptr_t)grad_x + map, (const float *)(uintptr_t)grad_y + map,
                     (const float *)(uintptr_t)weights + (size_t)n * cells,
                     (const float *)(uintptr_t)stacked + (size_t)n * (channels + 1) * cells, current + (size_t)n * 6,
                     next + (size_t)n * 6, robust, taken < shear_free_steps, damping, content_level, robust_scale,
                     work, weight, scratch, products);
        }
        for (int e = 0; e < batch * 6; e++) {
            const double change = fabs((double)next[e] - current[e]);
            if (change > moved || change != change) moved = change != change ? INFINITY : change;
        }
        memcpy(current, next, sizeof(float) * (size_t)batch * 6);
        taken++;
        /* A level stops once no entry of any pair's theta moved by more than the tolerance. */
        if (tolerance > 0 && moved < tolerance) break;
    }
    Py_END_ALLOW_THREADS
    free(work);
    return PyLong_FromLong(taken);
}

static PyMethodDef methods[] = {
    {"gauss_newton_refine", gauss_newton_refine, METH_VARARGS,
     "Up to `iterations` affine Gauss-Newton steps on contiguous float32 buffers; returns the steps taken."},
    {"compare_with_identity", compare_with_identity, METH_VARARGS,
     "Median cell residuals of an affine answer and of the identity, and their shared cover."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups",
                                    "The Gauss-Newton level and identity comparison of stn_diffusers.gauss_newton in C.", -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
